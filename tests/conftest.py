"""Command-line options of the conformance suite (tests/conformance/).

pytest reads ``pytest_addoption`` only from conftest files it loads before
parsing the command line, so the options live here, at the tests root; the
suite itself is in tests/conformance/conftest.py.  Each option falls back to
an environment variable, so ``make test`` (no options) runs the suite against
the reference implementations.  See docs/CONFORMANCE.md.
"""

import os

import pytest


@pytest.fixture
def other_user():
    """A throw-away local user (useradd), removed at the end (tests/localuser.py)."""
    from localuser import local_user
    yield from local_user()


@pytest.fixture
def hub_a1(tmp_path):
    """An in-process hub (heartbeat 0.2 s) that knows agent a1: (hub, a1's secret)."""
    import rephub
    from hubtools import make_agents_file
    agents = str(tmp_path / "agents")
    secret = make_agents_file(agents, "a1")["a1"]
    hub = rephub.Hub(str(tmp_path / "data"), agents, heartbeat=0.2)
    hub.start()
    try:
        yield hub, secret
    finally:
        hub.shutdown(grace=5)


def pytest_addoption(parser):
    group = parser.getgroup("conformance", "PROTOCOL.md conformance suite (tests/conformance)")
    env = os.environ.get
    group.addoption("--hub", default=env("REPAGENT_CONF_HUB"), metavar="HOST:PORT",
                    help="judge the hub listening there (env REPAGENT_CONF_HUB)")
    group.addoption("--agent-id", default=env("REPAGENT_CONF_AGENT_ID"),
                    help="agent id the hub under test knows, or the agent under test uses")
    group.addoption("--secret-file", default=env("REPAGENT_CONF_SECRET_FILE"),
                    help="file holding that agent's secret as hex")
    group.addoption("--agent2-id", default=env("REPAGENT_CONF_AGENT2_ID"),
                    help="a second agent the hub under test knows (ownership tests)")
    group.addoption("--agent2-secret-file", default=env("REPAGENT_CONF_AGENT2_SECRET_FILE"))
    group.addoption("--agent-listen", default=env("REPAGENT_CONF_AGENT_LISTEN"),
                    metavar="HOST:PORT",
                    help="play the hub there and judge the agent that connects "
                         "(env REPAGENT_CONF_AGENT_LISTEN)")
    group.addoption("--agent-nbd", default=env("REPAGENT_CONF_AGENT_NBD"), metavar="NBD-URI",
                    help="NBD export of the disk the agent under test protects, for guest writes")
    group.addoption("--independent-codec", action="store_true",
                    default=env("REPAGENT_CONF_CODEC") == "independent",
                    help="speak through the codec written from PROTOCOL.md's tables")
    group.addoption("--conformance-report", default=env("REPAGENT_CONF_REPORT"), metavar="DIR",
                    help="where the clause table goes (Markdown and JUnit XML); "
                         "default: a directory under the system temp dir")

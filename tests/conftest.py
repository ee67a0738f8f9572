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
def hub_factory(tmp_path):
    """In-process hubs, stopped at the end: ``hub_factory(*agent_ids, recover=
    {agent: owner}, **Hub options)`` starts one that knows ``agent_ids`` (a1 if
    none) and returns it, its ``secrets`` set to {agent: secret} and
    ``secret`` to a1's.  The first has its data in tmp_path/data, its agents
    file in tmp_path/agents; later ones in data1, agents1, ..."""
    import rephub
    from hubtools import make_agents_file
    hubs = []

    def make(*agent_ids: str, recover: dict[str, str] | None = None, **options):
        suffix = str(len(hubs)) if hubs else ""
        agents = str(tmp_path / f"agents{suffix}")
        secrets = make_agents_file(agents, *(agent_ids or ("a1",)), recover=recover)
        hub = rephub.Hub(str(tmp_path / f"data{suffix}"), agents, **options)
        hub.start()
        hubs.append(hub)
        hub.secrets, hub.secret = secrets, secrets.get("a1")
        return hub
    try:
        yield make
    finally:
        for hub in hubs:
            hub.shutdown(grace=5)


@pytest.fixture
def hub_a1(hub_factory):
    """An in-process hub (heartbeat 0.2 s) that knows agent a1: (hub, a1's secret)."""
    hub = hub_factory("a1", heartbeat=0.2)
    return hub, hub.secret


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

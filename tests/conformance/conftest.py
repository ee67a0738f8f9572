"""The conformance suite's fixtures, clause marker and clause-table report.

Which implementation is judged (options are registered in tests/conftest.py):

    --hub HOST:PORT --agent-id ID --secret-file F   the hub there (hub tests only)
    --agent-listen HOST:PORT [--agent-id --secret-file --agent-nbd URI]
                                                    the agent that connects there
                                                    (agent tests only)
    neither                                         rephub.py and repagent.py,
                                                    started by the suite

``REPAGENT_CONF_VARIANT`` swaps in a small fake instead (test_broken.py runs
the suite that way): ``fake-hub``, ``broken-hub`` (ACKs before durability),
``fake-agent``, ``broken-agent`` (clears dirty marks without ACK).
``REPAGENT_CONF_CODEC=broken-header-crc`` makes the suite's peers use a codec
that ignores the header CRC.

Every test carries ``@pytest.mark.clause("HS-3", ...)``; at the end the
outcome per clause of PROTOCOL.md's clause index is written to
``<report dir>/conformance.md`` and ``conformance.xml`` (JUnit).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path
from xml.sax.saxutils import quoteattr

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (str(HERE), str(ROOT), str(ROOT / "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

import pytest  # noqa: E402

import cf_codec  # noqa: E402
from cf_targets import (ExternalAgent, ExternalHub, FakeAgent, FakeHub, RefAgent,  # noqa: E402
                        RefHub, parse_hostport, read_secret)

SPEC = ROOT / "PROTOCOL.md"
VARIANT = os.environ.get("REPAGENT_CONF_VARIANT", "")


def clause_index(spec: Path = SPEC) -> dict[str, str]:
    """{clause id: summary} from PROTOCOL.md's "Clause index" table."""
    text = spec.read_text(encoding="utf-8")
    start = text.find("## Clause index")
    if start < 0:
        return {}
    rows = re.findall(r"^\|\s*([A-Z]{2}-\d+)\s*\|\s*(.*?)\s*\|\s*$", text[start:], re.M)
    return dict(rows)


# ---------------------------------------------------------------------------
# Configuration


class Setup:
    """What this run judges, from the options."""

    def __init__(self, config):
        opt = config.getoption
        self.hub = opt("--hub")
        self.agent_listen = opt("--agent-listen")
        self.agent_id = opt("--agent-id")
        self.secret_file = opt("--secret-file")
        self.agent2 = None
        if opt("--agent2-id") and opt("--agent2-secret-file"):
            self.agent2 = (opt("--agent2-id"), read_secret(opt("--agent2-secret-file")))
        self.agent_nbd = opt("--agent-nbd")
        codec = os.environ.get("REPAGENT_CONF_CODEC", "")
        if codec not in cf_codec.CODECS:
            codec = "independent" if opt("--independent-codec") else "reference"
        self.codec_name = codec
        self.report_dir = opt("--conformance-report")
        self.judge_hub = bool(self.hub) or not self.agent_listen
        self.judge_agent = bool(self.agent_listen) or not self.hub
        if VARIANT.endswith("hub"):
            self.judge_agent = False
        if VARIANT.endswith("agent"):
            self.judge_hub = False
        #: The reference implementations are judged (xfail markers of known bugs apply).
        self.ref_hub = self.judge_hub and not self.hub and not VARIANT
        self.ref_agent = self.judge_agent and not self.agent_listen and not VARIANT

    def describe(self) -> str:
        hub = self.hub or (VARIANT if VARIANT.endswith("hub") else "rephub.py (reference)")
        agent = self.agent_listen or (VARIANT if VARIANT.endswith("agent")
                                      else "repagent.py (reference)")
        return (f"hub: {hub if self.judge_hub else 'not judged'}; agent: "
                f"{agent if self.judge_agent else 'not judged'}; codec: {self.codec_name}")


def _setup(config) -> Setup:
    if not hasattr(config, "_cf_setup"):
        config._cf_setup = Setup(config)
    return config._cf_setup


def pytest_configure(config):
    _setup(config)
    config.addinivalue_line("markers", "clause(*ids): PROTOCOL.md clause ids a test checks")
    config.addinivalue_line("markers", "hub: a hub-direction conformance test")
    config.addinivalue_line("markers", "agent: an agent-direction conformance test")


@pytest.fixture(scope="session")
def setup(pytestconfig) -> Setup:
    return _setup(pytestconfig)


@pytest.fixture(scope="session")
def codec(setup):
    return cf_codec.make_codec(setup.codec_name)


@pytest.fixture(scope="session")
def hub(setup, codec):
    """The hub under test (a HubTarget)."""
    if not setup.judge_hub:
        pytest.skip("hub not judged in this run (--agent-listen given)")
    if setup.hub:
        if not (setup.agent_id and setup.secret_file):
            pytest.fail("--hub needs --agent-id and --secret-file")
        target = ExternalHub(parse_hostport(setup.hub), setup.agent_id,
                             read_secret(setup.secret_file), setup.agent2)
    elif VARIANT in ("fake-hub", "broken-hub"):
        target = FakeHub(codec, durable=VARIANT == "fake-hub").start()
    else:
        target = RefHub().start()
    try:
        yield target
    finally:
        target.stop()


@pytest.fixture(scope="module")
def agent_target(setup, codec):
    """The agent under test (an AgentTarget), not yet started."""
    if not setup.judge_agent:
        pytest.skip("agent not judged in this run (--hub given)")
    if setup.agent_listen:
        if not (setup.agent_id and setup.secret_file):
            pytest.fail("--agent-listen needs --agent-id and --secret-file")
        target = ExternalAgent(setup.agent_id, read_secret(setup.secret_file), setup.agent_nbd)
        target.listen = parse_hostport(setup.agent_listen)
    elif VARIANT in ("fake-agent", "broken-agent"):
        target = FakeAgent(codec, broken=VARIANT == "broken-agent")
        target.listen = ("127.0.0.1", 0)
    else:
        from qemu_harness import missing_tools
        if missing_tools():
            pytest.skip(f"reference agent needs QEMU tools: missing {missing_tools()}")
        target = RefAgent()
        target.listen = ("127.0.0.1", 0)
    try:
        yield target
    finally:
        target.stop()


# ---------------------------------------------------------------------------
# Outcomes per clause


_OUTCOMES: dict[str, dict] = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    marker = item.get_closest_marker("clause")
    if marker is None or HERE not in Path(str(item.fspath)).parents:
        return report
    entry = _OUTCOMES.setdefault(item.nodeid, {"clauses": marker.args, "outcome": None,
                                               "reason": ""})
    if hasattr(report, "wasxfail"):
        if report.skipped:
            entry.update(outcome="xfail", reason=report.wasxfail)
        else:
            entry.update(outcome="failed", reason=f"XPASS(strict): {report.wasxfail}")
    elif report.failed:
        entry.update(outcome="failed", reason=str(report.longrepr).splitlines()[-1][:300]
                     if report.longrepr else "")
    elif report.skipped and entry["outcome"] is None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
        entry.update(outcome="skipped", reason=str(reason))
    elif report.when == "call" and report.passed and entry["outcome"] is None:
        entry.update(outcome="passed")
    return report


def clause_table(index: dict[str, str]) -> list[dict]:
    """One row per clause: status pass / FAIL / known-fail / skipped / not tested."""
    rows = []
    for cid, summary in index.items():
        tests = [(node, e) for node, e in _OUTCOMES.items() if cid in e["clauses"]]
        outcomes = {e["outcome"] for _, e in tests}
        if "failed" in outcomes:
            status = "FAIL"
        elif "xfail" in outcomes:
            status = "known-fail"
        elif "passed" in outcomes:
            status = "pass"
        elif "skipped" in outcomes:
            status = "skipped"
        else:
            status = "not tested"
        notes = [f"{node.split('::')[-1]}: {e['reason']}" for node, e in tests
                 if e["outcome"] in ("failed", "xfail", "skipped") and e["reason"]]
        rows.append(dict(id=cid, summary=summary, status=status,
                         tests=[node.split("::")[-1] for node, _ in tests], notes=notes))
    return rows


def write_report(rows: list[dict], directory: Path, title: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    counts = {s: sum(r["status"] == s for r in rows)
              for s in ("pass", "FAIL", "known-fail", "skipped", "not tested")}
    md = [f"# PROTOCOL.md conformance: {title}", "",
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; "
          + ", ".join(f"{n} {s}" for s, n in counts.items()), "",
          "| clause | summary | status | tests | notes |", "|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['id']} | {r['summary']} | {r['status']} | {', '.join(r['tests'])} | "
                  f"{'; '.join(r['notes']).replace('|', '/')[:400]} |")
    md_path = directory / "conformance.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    xml = ['<?xml version="1.0" encoding="UTF-8"?>',
           f'<testsuites><testsuite name={quoteattr("PROTOCOL.md clauses: " + title)} '
           f'tests="{len(rows)}" failures="{counts["FAIL"]}" '
           f'skipped="{len(rows) - counts["pass"] - counts["FAIL"]}">']
    for r in rows:
        xml.append(f'<testcase classname="PROTOCOL.md" name={quoteattr(r["id"] + " " + r["summary"])}>')
        note = "; ".join(r["notes"]) or r["status"]
        if r["status"] == "FAIL":
            xml.append(f'<failure message={quoteattr(note)}/>')
        elif r["status"] != "pass":
            xml.append(f'<skipped message={quoteattr(r["status"] + ": " + note)}/>')
        xml.append("</testcase>")
    xml.append("</testsuite></testsuites>")
    xml_path = directory / "conformance.xml"
    xml_path.write_text("\n".join(xml) + "\n", encoding="utf-8")
    return md_path, xml_path


def pytest_sessionfinish(session, exitstatus):
    if not _OUTCOMES:
        return
    setup = _setup(session.config)
    directory = Path(setup.report_dir) if setup.report_dir else \
        Path(tempfile.gettempdir()) / f"repagent-conformance-{os.getuid()}"
    rows = clause_table(clause_index())
    session.config._cf_report = (rows, *write_report(rows, directory, setup.describe()))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    report = getattr(config, "_cf_report", None)
    if report is None:
        return
    rows, md_path, xml_path = report
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    terminalreporter.write_sep("-", "PROTOCOL.md clauses")
    terminalreporter.write_line(_setup(config).describe())
    terminalreporter.write_line(", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for r in rows:
        if r["status"] in ("FAIL", "known-fail"):
            terminalreporter.write_line(f"  {r['id']:6} {r['status']:10} {r['summary']}")
    terminalreporter.write_line(f"clause table: {md_path} and {xml_path}")

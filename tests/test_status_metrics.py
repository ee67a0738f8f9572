"""Status at a glance: ``--metrics-listen`` (Prometheus text) and ``status --watch``.

The hub runs in-process with its metrics server on 127.0.0.1:0 and is
scraped over HTTP; the agent's metrics come from the real ``Agent.status``
of an agent wired to a scripted hub over a socketpair (as in test_agent.py),
served by its real ``MetricsServer``.  ``status --watch`` runs as a
subprocess, is read with a deadline and stopped with SIGINT.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

import ops
import protocol as p
import repagent as ra
import rephub
from hubtools import REPHUB, MemVolume, TestAgent, make_agents_file, wait_until
from procs import HubProc

MiB = 1024 * 1024
CHUNK = 64 * 1024
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# -- a tiny parser for the text format (version 0.0.4) -------------------------------

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')
UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_metrics(text: str) -> dict:
    """{(name, ((label, value), ...)): float}; fails on a line the format does not allow
    and on a sample whose family has no # TYPE before it."""
    types, samples = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge"), line
            types[name] = kind
            continue
        if line.startswith("# HELP ") or not line:
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, body, value = m.groups()
        assert name in types, f"{name} has no # TYPE line"
        labels, pos = [], 0
        while body and pos < len(body):
            lm = LABEL.match(body, pos)
            assert lm, f"bad labels in {line!r}"
            labels.append((lm.group(1), re.sub(r'\\[\\"n]', lambda e: UNESCAPE[e.group()],
                                               lm.group(2))))
            pos = lm.end()
        samples[(name, tuple(sorted(labels)))] = float(value)
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def scrape(address, path="/metrics") -> dict:
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}{path}", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse_metrics(r.read().decode())


def test_label_values_are_escaped_and_parse_back():
    name = 'disk "a"\\b\nc'
    text = ops.prometheus_text([("x_total", "counter", "h", [({"volume": name}, 7)])])
    assert value(parse_metrics(text), "x_total", volume=name) == 7
    assert ops.prometheus_text([("y", "gauge", "h", [({"v": name}, 1.5)])]) == \
        '# HELP y h\n# TYPE y gauge\ny{v="disk \\"a\\"\\\\b\\nc"} 1.5\n'


# -- the hub ---------------------------------------------------------------------------


@pytest.fixture
def hub_with_metrics(tmp_path):
    agents = str(tmp_path / "agents")
    secrets_by_id = make_agents_file(agents, "a1")
    hub = rephub.Hub(str(tmp_path / "data"), agents, heartbeat=0.2,
                     metrics_listen=("127.0.0.1", 0))
    hub.start()
    try:
        yield hub, secrets_by_id
    finally:
        hub.shutdown(grace=5)


def test_hub_metrics_follow_writes_state_and_errors(hub_with_metrics):
    hub, sec = hub_with_metrics
    addr = hub.metrics.address
    assert addr[1] != 0
    with TestAgent(hub.address, "a1", sec["a1"]).connect() as agent:
        vid, _ = agent.attach("m1", MemVolume(MiB, os.urandom(MiB)))
        wait_until(lambda: hub.store.volume("m1").state == rephub.VolState.CONSISTENT
                   and hub.store.volume("m1").sync is None, 20, "m1 consistent")
        wait_until(lambda: hub.status()["agents"][0]["rtt_ms"] is not None, 10, "heartbeat")
        before = scrape(addr)
        assert value(before, "rephub_volume_state", volume="m1", state="consistent") == 1
        assert value(before, "rephub_volume_state", volume="m1", state="inconsistent") == 0
        assert value(before, "rephub_sync_done_bytes", volume="m1", plan="FULL") == MiB
        assert value(before, "rephub_sync_total_bytes", volume="m1", plan="FULL") == MiB
        assert value(before, "rephub_sync_running", volume="m1") == 0
        assert value(before, "rephub_agents_connected") == 1
        assert value(before, "rephub_agent_rtt_seconds", agent="a1") > 0
        assert value(before, "rephub_errors_total", kind="auth") == 0
        assert value(before, "rephub_volume_lag_bytes", volume="m1") >= 0

        sizes = (512, 4096, 65536, 3 * 4096)
        for i, n in enumerate(sizes):
            agent.expect_ack(agent.write(vid, i * 131072, os.urandom(n)))
        agent.expect_ack(agent.zero(vid, 6 * 131072, 65536))  # a ZERO carries no data
        after = scrape(addr)
        assert value(after, "rephub_replicated_bytes_total", volume="m1") - \
            value(before, "rephub_replicated_bytes_total", volume="m1") == sum(sizes)
        assert value(after, "rephub_journal_fdatasyncs_total") > \
            value(before, "rephub_journal_fdatasyncs_total")

    with socket.create_connection(hub.address, timeout=10) as sock:  # a wrong AUTH proof
        p.send_message(sock, p.Hello(nonce=os.urandom(32), agent_id="a1"))
        assert isinstance(p.recv_message(sock), p.HelloReply)
        p.send_message(sock, p.Auth(proof=bytes(32)))
        err = p.recv_message(sock)
        assert isinstance(err, p.Error) and err.code == p.ErrorCode.AUTH_FAILED
    wait_until(lambda: hub.status()["errors"].get("auth") == 1, 10, "auth failure counted")
    wait_until(lambda: not hub.status()["agents"], 10, "agent gone")
    last = scrape(addr)
    assert value(last, "rephub_errors_total", kind="auth") == 1
    assert value(last, "rephub_agents_connected") == 0
    assert value(last, "rephub_volume_attached", volume="m1") == 0

    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}/other", timeout=10)
    assert info.value.code == 404


def test_hub_metrics_server_stops_with_the_hub(tmp_path):
    agents = str(tmp_path / "agents")
    make_agents_file(agents, "a1")
    hub = rephub.Hub(str(tmp_path / "data"), agents, metrics_listen=("127.0.0.1", 0))
    hub.start()
    addr, thread = hub.metrics.address, hub.metrics.thread
    assert thread.name == "rephub-metrics" and thread.is_alive()
    hub.shutdown(grace=5)
    assert not thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(addr, timeout=2).close()


def test_serve_metrics_listen_logs_its_port_and_serves(tmp_path):
    agents = str(tmp_path / "agents")
    make_agents_file(agents, "a1")
    hub = HubProc(tmp_path, agents=agents, args=["--metrics-listen", "127.0.0.1:0"])
    try:
        hub.start()
        m = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", hub.read_log())
        assert m, hub.read_log()
        samples = scrape(("127.0.0.1", int(m.group(1))))
        assert value(samples, "rephub_agents_connected") == 0
        assert value(samples, "rephub_errors_total", kind="protocol") == 0
        hub.proc.send_signal(signal.SIGTERM)
        assert hub.proc.wait(timeout=30) == 0
    finally:
        hub.kill()


# -- the agent (no QEMU: a scripted hub on a socketpair, as in test_agent.py) ----------


@pytest.fixture
def agent_rig(tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(16 * CHUNK))
    cfg = ra.Config(hub=("127.0.0.1", 1), agent_id="a1", secret=b"s" * 32, qmp="-",
                    nodes=[("disk0", "vol0")], state_dir=str(tmp_path / "state"))
    os.makedirs(cfg.state_dir)
    agent = ra.Agent(cfg)
    vol = agent.volumes[0]
    vol.size = 16 * CHUNK
    vol.bitmap = ra.DirtyBitmap(vol.bitmap_path, vol.size, CHUNK)
    vol.source = lambda: ra.FileSource(str(image))
    ours, theirs = socket.socketpair()
    theirs.settimeout(10)
    conn = agent.link.adopt(ours, {vol: 1})
    try:
        yield agent, vol, theirs
    finally:
        agent.stopping.set()
        if agent.metrics is not None:
            agent.metrics.close()
        conn.close("test over")
        conn.join(2)
        for t in agent.threads:
            t.join(2)
        if agent.control is not None:
            agent.control.close()
        theirs.close()
        vol.bitmap.close()


def test_agent_metrics_show_dirty_queue_sent_and_errors(agent_rig):
    agent, vol, hub = agent_rig
    agent.metrics = ra.MetricsServer(("127.0.0.1", 0), lambda: ra.agent_metrics(agent.status()),
                                     "repagent-metrics", ra.log)
    addr = agent.metrics.address
    agent.stream.protected_write(vol, 4096, 8192, memoryview(b"x" * 8192), lambda code: None)
    msg = p.recv_message(hub)
    assert msg.TYPE == p.MsgType.WRITE
    m = scrape(addr)
    assert value(m, "repagent_connection_up", hub="127.0.0.1:1") == 1
    assert value(m, "repagent_degraded") == 0
    assert value(m, "repagent_dirty_bytes", volume="vol0") == CHUNK
    assert value(m, "repagent_pending_writes") == 1
    assert value(m, "repagent_sent_bytes_total", volume="vol0", kind="write") == 8192
    assert value(m, "repagent_errors_total", kind="hub_error") == 0
    assert ("repagent_last_ack_age_seconds", ()) not in m   # no ACK yet: no sample

    p.send_message(hub, p.Ack(request_id=msg.request_id))
    p.send_message(hub, p.Error(request_id=999, code=p.ErrorCode.INVALID,
                                failed_type=p.MsgType.PING, message="test"))
    wait_until(lambda: agent.status()["errors"].get("hub_error") == 1, 10, "hub error counted")
    m = scrape(addr)
    assert value(m, "repagent_dirty_bytes", volume="vol0") == 0
    assert value(m, "repagent_pending_writes") == 0
    assert value(m, "repagent_queue_bytes", volume="vol0") == 0
    assert 0 <= value(m, "repagent_last_ack_age_seconds") < 10
    assert value(m, "repagent_errors_total", kind="hub_error") == 1

    text = ra.format_status(agent.status())
    header, row = text.splitlines()[3:5]
    assert row.startswith("vol0") and "1.0 MiB" in row and "8.0 KiB" in row
    assert header.index("SIZE") + len("SIZE") == row.index("1.0 MiB") + len("1.0 MiB")
    assert "warnings since start: hub_error 1" in text


# -- status --watch ------------------------------------------------------------------------


def run_watch(argv, refreshes: int, is_refresh, timeout: float = 15.0) -> list[str]:
    """Start ``argv``, collect stdout lines until ``refreshes`` lines pass
    ``is_refresh``, then SIGINT it; assert it exits 0; return the lines."""
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout],
                              name="watch-stdout", daemon=True)
    reader.start()
    seen, count = [], 0
    try:
        deadline = time.monotonic() + timeout
        while count < refreshes:
            left = deadline - time.monotonic()
            assert left > 0, f"only {count} refreshes in {timeout} s: {seen}"
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                continue
            seen.append(line)
            count += bool(is_refresh(line))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
        proc.stdout.close()
        proc.stderr.close()
    return seen


def test_hub_status_watch_redraws_until_ctrl_c(hub_with_metrics):
    hub, sec = hub_with_metrics
    with TestAgent(hub.address, "a1", sec["a1"]).connect() as agent:
        agent.attach("w1", MemVolume(MiB, b"w" * MiB))
        wait_until(lambda: hub.store.volume("w1").state == rephub.VolState.CONSISTENT,
                   20, "w1 consistent")
        seen = run_watch([sys.executable, REPHUB, "status", "--data", hub.store.dir,
                          "--watch", "0.2"], 2, lambda x: x.startswith("every 0.2 s"))
        assert "\x1b[" not in "".join(seen)       # not a terminal: no screen clearing
        row = next(x for x in seen if x.startswith("w1 "))
        assert "consistent" in row and "attached" in row and "1.0 MiB" in row
        docs = run_watch([sys.executable, REPHUB, "status", "--data", hub.store.dir,
                          "--watch", "0.2", "--json"], 2, lambda x: x.startswith("{"))
        for line in docs:
            st = json.loads(line)                  # one document per line
            assert st["hub_id"] == hub.store.hub_id and st["volumes"][0]["name"] == "w1"


def test_agent_status_watch_redraws_until_ctrl_c(agent_rig):
    agent, vol, hub = agent_rig
    agent._start_control()
    t = threading.Thread(target=agent._control_loop, name="repagent-control", daemon=True)
    t.start()
    agent.threads.append(t)
    seen = run_watch([sys.executable, os.path.join(ROOT, "repagent.py"), "status",
                      "--state-dir", agent.cfg.state_dir, "--watch", "0.2"], 2,
                     lambda x: x.startswith("every 0.2 s"))
    assert any(x.startswith("vol0 ") and "attached" in x for x in seen), seen
    assert any("-> hub 127.0.0.1:1: connected" in x for x in seen), seen


@pytest.mark.parametrize("daemon", ["repagent.py", "rephub.py"])
@pytest.mark.parametrize("interval", ["0", "-1"])
def test_watch_refuses_an_interval_that_is_not_positive(tmp_path, daemon, interval):
    where = ["--state-dir" if daemon == "repagent.py" else "--data", str(tmp_path)]
    r = subprocess.run([sys.executable, os.path.join(ROOT, daemon), "status", *where,
                        "--watch", interval], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "the interval must be > 0 seconds" in r.stderr, r

"""repagent's side of fail-back (PROTOCOL.md "Fail-back") on real qemu-storage-daemon.

An in-process ``repagent.Agent`` protects node ``disk0`` of a real QSD (its
own QMP monitor, a mirror into its NBD target) and connects to a scripted hub
(``Hub`` below: a TCP listener on 127.0.0.1 that speaks the hub's half of the
handshake, grants FAILBACK, answers ATTACH with the plan a test chooses and
records every frame).  QSD is set up as an operator would for a fail-back:

    export exp0  writable, the VM's (added before the mirror, so it moves onto
                 the mirror's filter); tests that fail back remove it first
    export src   read-only, the agent's ``--source disk0=nbd+unix:///src?...``
                 (a read-only export holds no "write" on the node)

What lands in QSD is read back through ``src``.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import nbd
import protocol as p
import repagent as ra
from qemu_harness import QSD, MiB, requires_qemu, short_tmpdir, wait_until

pytestmark = requires_qemu

SIZE = 8 * MiB
CHUNK = 64 * 1024
T = 15.0
SRC = "src"


def hub_handshake(sock: socket.socket, secret: bytes, features: int) -> p.Hello:
    """The hub's half of HELLO .. AUTH_OK on an accepted socket."""
    hello = p.recv_message(sock)
    assert isinstance(hello, p.Hello), hello
    nonce = os.urandom(p.NONCE_SIZE)
    p.send_message(sock, p.HelloReply(
        features=features, nonce=nonce, hub_id="hub",
        proof=p.hub_proof(secret, hello.nonce, nonce, hello.agent_id, "hub")))
    assert isinstance(p.recv_message(sock), p.Auth)
    p.send_message(sock, p.AuthOk())
    return hello


class Hub:
    """The hub's end: accept, handshake, ATTACHED(plan), record frames, answer PINGs."""

    def __init__(self, secret: bytes, features=p.Feature.FAILBACK):
        self.secret, self.features = secret, int(features)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.plan = p.SyncPlan.DEMOTED
        self.sock: socket.socket | None = None
        self.frames: list[p.Message] = []
        self.cond = threading.Condition()
        self.closed = threading.Event()
        self.next_req = 1 << 40

    def accept(self) -> "Hub":
        """The agent's next connection, up to its ATTACHED."""
        self.listener.settimeout(T)
        sock, _ = self.listener.accept()
        sock.settimeout(T)
        hello = hub_handshake(sock, self.secret, self.features)
        assert hello.features & p.Feature.FAILBACK, "the agent offers FAILBACK"
        attach = p.recv_message(sock)
        assert isinstance(attach, p.Attach), attach
        self.attach = attach
        sock.settimeout(None)
        self.sock, self.frames, self.closed = sock, [], threading.Event()
        self.send(p.Attached(request_id=attach.request_id, volume=1, plan=self.plan))
        threading.Thread(target=self._recv_loop, args=(sock, self.frames, self.closed),
                         name="test-hub-recv", daemon=True).start()
        return self

    def _recv_loop(self, sock, frames, closed) -> None:
        try:
            while (msg := p.recv_message(sock)) is not None:
                if isinstance(msg, p.Ping):
                    self.send(p.Pong(request_id=msg.request_id, echo_ns=msg.sent_ns))
                    continue
                with self.cond:
                    frames.append(msg)
                    self.cond.notify_all()
        except (OSError, p.ReplicationError):
            pass
        finally:
            closed.set()
            with self.cond:
                self.cond.notify_all()

    def send(self, msg: p.Message) -> None:
        p.send_message(self.sock, msg)

    def wait_for(self, pred, what: str, timeout: float = T) -> p.Message:
        with self.cond:
            ok = self.cond.wait_for(lambda: any(pred(f) for f in self.frames), timeout)
            assert ok, f"no {what} within {timeout}s; got {[f.describe() for f in self.frames]}"
            return next(f for f in self.frames if pred(f))

    def request(self, msg: p.Message, timeout: float = T) -> p.Message:
        """Send with a fresh request id; the answer (ACK, ERROR, ...) with that id."""
        self.next_req += 1
        msg.request_id = self.next_req
        self.send(msg)
        return self.wait_for(lambda f: f.request_id == msg.request_id,
                             f"answer to {msg.TYPE.name}", timeout)

    def of_type(self, msg_type: p.MsgType) -> list[p.Message]:
        with self.cond:
            return [f for f in self.frames if f.TYPE == msg_type]

    def drop(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.listener.close()


@pytest.fixture
def world(tmp_path):
    """make(accept=True, plan=DEMOTED, source=True) -> (agent, vol, qsd, hub), connected."""
    made = []

    def make(accept=True, plan=p.SyncPlan.DEMOTED, source=True):
        run = short_tmpdir("fbag")
        qsd = QSD(tmp_path / "qsd", size=SIZE, extra_args=[
            "--chardev", f"socket,id=qmp1,path={run}/aqmp.sock,server=on,wait=off",
            "--monitor", "chardev=qmp1",
            "--export", "type=nbd,id=src,node-name=disk0,name=src,writable=off"])
        qsd.start()
        secret = secrets.token_bytes(32)
        hub = Hub(secret)
        hub.plan = plan
        cfg = ra.Config(hub=hub.address, agent_id="a1", secret=secret,
                        qmp=str(run / "aqmp.sock"), nodes=[("disk0", "vol0")],
                        state_dir=str(run / "state"), hub_timeout=30.0,
                        sources={"disk0": (str(qsd.export_path), SRC)} if source else {},
                        accept_failback=accept)
        agent = ra.Agent(cfg)
        made.append((agent, qsd, hub, run))
        agent.start()
        hub.accept()
        vol = agent.volumes[0]
        wait_until(lambda: vol.volume_id == 1, T, "ATTACHED taken")
        return agent, vol, qsd, hub

    yield make
    for agent, qsd, hub, run in made:
        qsd.kill()          # first: a QSD quitting with its mirror target gone waits 5 s
        hub.close()
        if agent.link.link_state != ra.LinkState.STOPPED:
            agent.stop()
        qsd.close()
        shutil.rmtree(run, ignore_errors=True)


def read_node(qsd: QSD, offset: int, length: int) -> bytes:
    with nbd.NBDClient(str(qsd.export_path), SRC) as c:
        return c.read(offset, length)


def guest_write(qsd: QSD, export: str, offset: int, data: bytes) -> None:
    with nbd.NBDClient(str(qsd.export_path), export) as c:
        c.write(offset, data)


def jobs(qsd: QSD) -> list[str]:
    return [j["device"] for j in qsd.qmp("query-block-jobs")]


def exports(qsd: QSD) -> set[str]:
    return {e["id"] for e in qsd.qmp("query-block-exports")}


def begin(hub: Hub) -> p.Message:
    return hub.request(p.FailbackBegin(volume=1))


def stop_vm(qsd: QSD) -> None:
    """What the operator does before a fail-back: the VM's export goes."""
    qsd.qmp("block-export-del", id="exp0")
    wait_until(lambda: "exp0" not in exports(qsd), T, "exp0 gone")


def error(msg: p.Message) -> tuple[str, str]:
    assert isinstance(msg, p.Error), f"expected ERROR, got {msg.describe()}"
    return msg.code_name(), msg.message


# ---------------------------------------------------------------------------


def test_demoted_volume_marks_guest_writes_and_sends_none(world, caplog):
    agent, vol, qsd, hub = world()
    # ATTACHED sets the volume id before the agent logs the demotion: wait for the line.
    wait_until(lambda: "was promoted at the recovery site; this side is demoted" in caplog.text,
               T, "the demotion logged")
    guest_write(qsd, qsd.export_name, 3 * CHUNK + 512, b"L" * 4096)      # through the mirror
    wait_until(lambda: vol.bitmap.is_set(3), T, "the late write marked")
    reply = hub.request(p.Read(volume=1, offset=3 * CHUNK, length=CHUNK))
    assert reply.TYPE == p.MsgType.READ_REPLY and bytes(reply.data[512:4608]) == b"L" * 4096
    hub.send(p.Synced(request_id=reply.request_id, volume=1, offset=3 * CHUNK, length=CHUNK))
    dmap = hub.request(p.DirtyQuery(volume=1))
    assert dmap.extents == [(3 * CHUNK, 2 * 4096)], \
        "a SYNCED on a demoted volume clears nothing (of the two 4 KiB blocks written)"
    assert hub.of_type(p.MsgType.WRITE) == [] and hub.of_type(p.MsgType.ZERO) == []
    st = agent.status()["volumes"][0]
    assert st["role"] == "demoted" and st["counters"]["demoted_writes"] >= 1
    assert "attached, demoted" in ra.format_status(agent.status())
    assert "repagent_volume_demoted{volume=\"vol0\"} 1" in ra.agent_metrics(agent.status())


def test_begin_without_accept_failback_is_not_allowed(world):
    agent, vol, qsd, hub = world(accept=False)
    stop_vm(qsd)
    code, text = error(begin(hub))
    assert code == "NOT_ALLOWED" and "--accept-failback" in text
    assert jobs(qsd) == [vol.meta["job_id"]], "the mirror is left alone"
    assert ra.failback_export("vol0") not in exports(qsd)


def test_begin_without_source_is_not_allowed(world):
    agent, vol, qsd, hub = world(source=False)
    stop_vm(qsd)
    code, text = error(begin(hub))
    assert code == "NOT_ALLOWED" and "--source disk0=" in text


def test_begin_on_a_volume_not_demoted_and_put_end_without_begin_are_bad_phase(world):
    agent, vol, qsd, hub = world(plan=p.SyncPlan.NONE)
    stop_vm(qsd)
    assert error(begin(hub))[0] == "BAD_PHASE"
    assert error(hub.request(p.Put(volume=1, offset=0, length=4096, data=b"x" * 4096)))[0] \
        == "BAD_PHASE"
    assert error(hub.request(p.FailbackEnd(volume=1)))[0] == "BAD_PHASE"
    assert not vol.bitmap.is_set(0), "a refused PUT marks nothing"
    assert read_node(qsd, 0, 4096) == bytes(4096), "a refused PUT writes nothing"


def test_another_writable_export_makes_begin_busy(world):
    agent, vol, qsd, hub = world()
    code, text = error(begin(hub))                # exp0, the VM's export, is still there
    assert code == "BUSY" and "exp0" in text and "block-export-del" in text
    assert jobs(qsd) == [vol.meta["job_id"]] and vol.failback is None
    assert ra.failback_export("vol0") not in exports(qsd)
    guest_write(qsd, qsd.export_name, 5 * CHUNK, b"B" * 4096)
    wait_until(lambda: vol.bitmap.is_set(5), T, "writes still tracked after BUSY")


def test_a_writer_appearing_during_begin_is_busy_and_the_mirror_comes_back(world,
                                                                          monkeypatch):
    """The second check (after our export is added) catches a writer the first
    missed: BUSY, our export deleted, the mirror set up again, and since that
    writer's writes could have escaped, every chunk is marked."""
    agent, vol, qsd, hub = world()
    stop_vm(qsd)
    real = ra.node_writers
    calls = []

    def racing(qmp, node):
        calls.append(node)
        if len(calls) == 2:   # between the checks a VM export appears on the node
            qsd.qmp("block-export-add", type="nbd", id="late", name="late",
                    writable=True, **{"node-name": "disk0"})
        return real(qmp, node)
    monkeypatch.setattr(ra, "node_writers", racing)
    code, text = error(begin(hub))
    assert code == "BUSY" and "late" in text
    assert ra.failback_export("vol0") not in exports(qsd)
    wait_until(lambda: qsd.job_status(vol.meta["job_id"]) == "ready", T, "mirror back")
    assert vol.failback is None and vol.meta["mirror"] and not vol.meta["needs_verify"]
    assert vol.bitmap.dirty_count == vol.bitmap.chunks


def test_puts_land_in_the_node_after_their_marks_and_done_resumes_streaming(world,
                                                                           monkeypatch):
    agent, vol, qsd, hub = world()
    stop_vm(qsd)
    ack = begin(hub)
    assert ack.TYPE == p.MsgType.ACK, ack.describe()
    assert jobs(qsd) == [], "no mirror while the hub writes"
    assert ra.failback_export("vol0") in exports(qsd)
    assert agent.status()["volumes"][0]["role"] == "failing back"
    assert ra.node_writers(agent.qemu.qmp, "disk0") == 1, "only the agent's own export writes"

    # The marks are set (and msync'ed) before QSD sees the data.
    client = vol.failback.client
    seen = []
    for name in ("write", "write_zeroes"):
        real = getattr(client, name)

        def spy(offset, *rest, real=real):
            seen.append(all(vol.bitmap.is_set(c) for c in range(offset // CHUNK,
                                                                 offset // CHUNK + 1)))
            return real(offset, *rest)
        monkeypatch.setattr(client, name, spy)

    rng = random.Random(8)
    data = rng.randbytes(1 << 20)
    puts = [p.Put(volume=1, offset=CHUNK, length=len(data), data=data),
            p.Put(volume=1, offset=4 * MiB + 4096, length=8192, data=b"\xab" * 8192),
            p.Put(volume=1, offset=2 * MiB, length=3 * CHUNK, flags=p.FLAG_ZERO)]
    for put in puts:
        put.request_id = hub.next_req = hub.next_req + 1
        hub.send(put)                                   # pipelined, as the hub does
    for put in puts:
        answer = hub.wait_for(lambda f, r=put.request_id: f.request_id == r, "PUT ACK")
        assert answer.TYPE == p.MsgType.ACK, answer.describe()
    assert seen == [True, True, True]
    assert read_node(qsd, CHUNK, len(data)) == data
    assert read_node(qsd, 4 * MiB + 4096, 8192) == b"\xab" * 8192
    assert read_node(qsd, 2 * MiB, 3 * CHUNK) == bytes(3 * CHUNK)
    assert vol.bitmap.extents() == [(CHUNK, 1 << 20), (2 * MiB, 3 * CHUNK),
                                    (4 * MiB, CHUNK)]
    assert agent.status()["volumes"][0]["failback"]["put_bytes"] == len(data) + 8192 + 3 * CHUNK

    flushed = []
    real_flush = client.flush
    monkeypatch.setattr(client, "flush", lambda: (flushed.append(True), real_flush())[1])
    done = hub.request(p.FailbackEnd(volume=1, outcome=p.FailbackOutcome.DONE))
    assert done.TYPE == p.MsgType.ACK, done.describe()
    assert flushed == [True], "flushed before the ACK"
    assert vol.bitmap.dirty_count == 0 and vol.bitmap.lost_seq == {}
    assert ra.failback_export("vol0") not in exports(qsd)
    assert qsd.job_status(vol.meta["job_id"]) == "ready"
    st = agent.status()["volumes"][0]
    assert (st["role"], st["plan"], st["needs_verify"]) == ("protected", "NONE", False)

    # The VM comes back with its export on the mirror's filter: writes stream again.
    qsd.qmp("block-export-add", type="nbd", id="vm", name="vm", writable=True,
            **{"node-name": vol.meta["filter_node"]})
    guest_write(qsd, "vm", 6 * MiB, b"W" * 4096)
    w = hub.wait_for(lambda f: f.TYPE == p.MsgType.WRITE, "a WRITE after the fail-back")
    assert (w.offset, bytes(w.data)) == (6 * MiB, b"W" * 4096)
    assert hub.frames.index(w) > hub.frames.index(done)


def test_abort_keeps_the_marks_and_the_demotion(world):
    agent, vol, qsd, hub = world()
    stop_vm(qsd)
    assert begin(hub).TYPE == p.MsgType.ACK
    put = hub.request(p.Put(volume=1, offset=7 * CHUNK, length=4096, data=b"P" * 4096))
    assert put.TYPE == p.MsgType.ACK
    end = hub.request(p.FailbackEnd(volume=1, outcome=p.FailbackOutcome.ABORT))
    assert end.TYPE == p.MsgType.ACK
    assert vol.bitmap.is_set(7), "the PUT region stays marked after ABORT"
    assert ra.failback_export("vol0") not in exports(qsd)
    assert qsd.job_status(vol.meta["job_id"]) == "ready"
    assert agent.status()["volumes"][0]["role"] == "demoted"
    assert error(hub.request(p.Put(volume=1, offset=0, length=512, data=b"x" * 512)))[0] \
        == "BAD_PHASE", "no PUT after the fail-back ended"
    # Still demoted: guest writes are marked, not sent; a new BEGIN is possible.
    qsd.qmp("block-export-add", type="nbd", id="vm", name="vm", writable=True,
            **{"node-name": vol.meta["filter_node"]})
    guest_write(qsd, "vm", 9 * CHUNK, b"D" * 4096)
    wait_until(lambda: vol.bitmap.is_set(9), T, "marked while demoted")
    assert hub.of_type(p.MsgType.WRITE) == []


def test_connection_lost_mid_failback_is_an_abort(world):
    agent, vol, qsd, hub = world()
    stop_vm(qsd)
    assert begin(hub).TYPE == p.MsgType.ACK
    assert hub.request(p.Put(volume=1, offset=2 * CHUNK, length=CHUNK,
                             data=b"C" * CHUNK)).TYPE == p.MsgType.ACK
    hub.drop()
    wait_until(lambda: vol.failback is None, T, "the fail-back undone")
    wait_until(lambda: qsd.job_status(vol.meta["job_id"]) == "ready", T, "mirror back")
    assert ra.failback_export("vol0") not in exports(qsd)
    hub.accept()                                          # the agent reconnects
    assert hub.attach.state == p.VolumeState.DIRTY
    dmap = hub.request(p.DirtyQuery(volume=1))
    assert (2 * CHUNK, CHUNK) in dmap.extents, "the PUT region is found again"
    assert begin(hub).TYPE == p.MsgType.ACK, "the operator can simply run it again"


def test_protect_cli_takes_accept_failback():
    args = ra.build_parser().parse_args([
        "protect", "--hub", "127.0.0.1:1", "--agent-id", "a", "--secret-file", "s",
        "--qmp", "q", "--node", "disk0=vol0", "--state-dir", "d", "--accept-failback"])
    assert args.accept_failback
    assert not ra.build_parser().parse_args([
        "protect", "--hub", "127.0.0.1:1", "--agent-id", "a", "--secret-file", "s",
        "--qmp", "q", "--node", "disk0=vol0", "--state-dir", "d"]).accept_failback


def test_a_write_refused_with_role_makes_the_agent_reattach_demoted(world):
    """Promoted while attached here: the next connection attaches it DEMOTED."""
    agent, vol, qsd, hub = world(plan=p.SyncPlan.NONE)
    guest_write(qsd, qsd.export_name, 4 * CHUNK, b"R" * 4096)
    w = hub.wait_for(lambda f: f.TYPE == p.MsgType.WRITE, "the guest's WRITE")
    hub.send(p.Error(request_id=w.request_id, code=p.ErrorCode.ROLE, failed_type=w.TYPE,
                     message="volume vol0 was promoted"))
    hub.plan = p.SyncPlan.DEMOTED
    hub.accept()
    assert hub.attach.state == p.VolumeState.DIRTY
    wait_until(lambda: agent.status()["volumes"][0]["role"] == "demoted", T, "demoted")
    assert hub.request(p.DirtyQuery(volume=1)).extents == [(4 * CHUNK, 4096)]


def test_stopping_mid_failback_removes_the_export_and_sets_the_mirror_up(world):
    agent, vol, qsd, hub = world()
    stop_vm(qsd)
    assert begin(hub).TYPE == p.MsgType.ACK
    assert hub.request(p.Put(volume=1, offset=0, length=4096,
                             data=b"S" * 4096)).TYPE == p.MsgType.ACK
    agent.stop()                                       # SIGTERM
    assert ra.failback_export("vol0") not in exports(qsd)
    assert qsd.job_status(vol.meta["job_id"]) == "ready"
    again = ra.DirtyBitmap(vol.bitmap_path, SIZE, CHUNK)
    try:
        assert again.is_set(0), "the PUT region stays marked on disk"
    finally:
        again.close()


@pytest.mark.parametrize("reason, code, rc", [
    ("bye", p.GoodbyeCode.FAILED_BACK, 0),           # PROTOCOL.md [FB-12]: the session ends
    ("volume vol0 failed back to agent a1", None, 1),  # the text alone decides nothing [LV-5]
    ("volume vol0 failed back to agent a1", p.GoodbyeCode.SHUTDOWN, 1),
    ("hub stopping", p.GoodbyeCode.SHUTDOWN, 1)])
def test_recover_ends_cleanly_when_its_volume_fails_back(tmp_path, reason, code, rc):
    """``repagent.py recover`` exits 0 on the hub's GOODBYE(FAILED_BACK) after a
    fail-back, 1 when the hub goes away with any other code, or none."""
    secret = secrets.token_bytes(32)
    (tmp_path / "secret").write_text(secret.hex() + "\n")
    (tmp_path / "secret").chmod(0o600)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(T)
    run = short_tmpdir("fbrc")
    proc = subprocess.Popen(
        [sys.executable, str(Path(ra.__file__)), "recover", "--hub",
         "%s:%d" % listener.getsockname()[:2], "--agent-id", "r1", "--secret-file",
         str(tmp_path / "secret"), "--volume", "vol0", "--at", "latest", "--failover",
         "--listen", f"unix:{run}/nbd.sock"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        sock, _ = listener.accept()
        sock.settimeout(T)
        hello = hub_handshake(sock, secret, p.Feature.GOODBYE_CODE)
        assert hello.features == p.Feature.GOODBYE_CODE, "recover offers GOODBYE_CODE"
        opened = p.recv_message(sock)
        assert isinstance(opened, p.RecoverOpen)
        p.send_message(sock, p.RecoverReady(request_id=opened.request_id, volume=1,
                                            size=SIZE, point_time_ns=1))
        assert proc.stdout.readline().startswith("nbd+unix://"), "the export is served"
        p.send_message(sock, p.Goodbye(reason=reason, code=code))
        out, err = proc.communicate(timeout=T)
        assert proc.returncode == rc, err
        if rc == 0:
            assert "failed back to its original site" in err
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(T)
        listener.close()
        shutil.rmtree(run, ignore_errors=True)


def test_a_writer_added_below_the_mirror_is_reported(world, caplog):
    """After a fail-back the VM's export must go on the mirror's filter: one
    added on the node itself bypasses the mirror, and the agent says so."""
    agent, vol, qsd, hub = world(plan=p.SyncPlan.NONE)
    qsd.qmp("block-export-add", type="nbd", id="vm", name="vm", writable=True,
            **{"node-name": "disk0"})
    wait_until(lambda: agent.status()["volumes"][0]["bypass_writers"] == 1, T,
               "the bypassing writer seen by the jobs thread")
    assert f"add exports on node {vol.meta['filter_node']} instead" in caplog.text
    qsd.qmp("block-export-del", id="vm")
    wait_until(lambda: agent.status()["volumes"][0]["bypass_writers"] == 0, T, "gone again")

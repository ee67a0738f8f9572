"""Recovery inside the hub, without QEMU: in-process ``rephub.Hub`` and ``TestAgent``.

Points inside a resync are not crash-consistent and are refused; who may open
a session; the TEST overlay's extent map against a bytearray model; leftover
overlays are discarded at start; a promotion interrupted before its roll back
finished is completed when the store opens again.
"""

from __future__ import annotations

import os
import random
import threading

import pytest

import protocol as p
import rephub
from hubtools import MemVolume, TestAgent, make_agents_file, wait_detached, wait_until

MiB = 1024 * 1024
CHUNK = 65536


@pytest.fixture
def hubenv(hub_factory):
    """An in-process hub with agents a1, a2 and rec, which may recover a1's
    volumes: (hub, {agent: secret})."""
    hub = hub_factory("a1", "a2", "rec", recover={"rec": "a1"}, heartbeat=0.2)
    return hub, hub.secrets


def connect(hub, secrets, agent="a1") -> TestAgent:
    return TestAgent(hub.address, agent, secrets[agent]).connect()


def synced(hub, name: str) -> bool:
    vol = hub.store.volume(name)
    return vol is not None and vol.state == rephub.VolState.CONSISTENT and vol.sync is None


def request(agent: TestAgent, msg: p.Message) -> p.Message:
    agent.send(msg)
    return agent.wait_reply(msg.request_id)


def open_session(agent, name, point, mode=p.RecoverMode.TEST) -> p.Message:
    return request(agent, p.RecoverOpen(request_id=agent.request_id(), mode=mode, name=name,
                                        point=point))


class HoldingAgent(TestAgent):
    """Answers the hub's READs only once ``gate`` is set (from a side thread, so
    its recv thread keeps answering PINGs and reading ACKs meanwhile)."""

    def __init__(self, address, agent_id, secret, gate, first):
        super().__init__(address, agent_id, secret)
        self.gate, self.first, self.holders = gate, first, []

    def on_READ(self, msg):
        self.first.set()

        def later():
            self.gate.wait(20)
            TestAgent.on_READ(self, msg)
        t = threading.Thread(target=later, name="held-read", daemon=True)
        self.holders.append(t)
        t.start()


def test_points_inside_a_resync_are_refused(hubenv):
    hub, secrets = hubenv
    mv = MemVolume(2 * MiB, data=os.urandom(2 * MiB))
    gen = os.urandom(16)
    a = connect(hub, secrets)
    vid, _ = a.attach("rv", mv, generation=gen)
    wait_until(lambda: synced(hub, "rv"), 20, "first sync")
    a.expect_ack(a.checkpoint("before"))
    a.close()
    wait_detached(hub, "rv")
    # Offline writes the agent tracked as dirty; the resync is held half way.
    mv.write(0, b"\x01" * CHUNK)
    mv.write(MiB, b"\x02" * CHUNK)
    mv.dirty = [(0, CHUNK), (MiB, CHUNK)]
    gate, first = threading.Event(), threading.Event()
    a = HoldingAgent(hub.address, "a1", secrets["a1"], gate, first).connect()
    try:
        vid, plan = a.attach("rv", mv, state=p.VolumeState.DIRTY, generation=gen)
        assert plan == p.SyncPlan.DIRTY
        wait_until(first.is_set, 20, "the resync's first READ")
        a.expect_ack(a.write(vid, 4 * CHUNK, b"\x03" * CHUNK))
        a.expect_ack(a.checkpoint("during"))
        vol = hub.store.volume("rv")
        with pytest.raises(p.RequestError) as err:
            hub.store.window.resolve_point(vol, "latest")
        assert err.value.code == p.ErrorCode.INCONSISTENT and "resync" in str(err.value)
        b = connect(hub, secrets, "rec")
        try:
            reply = open_session(b, "rv", "during")
            assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.INCONSISTENT
            assert isinstance(open_session(b, "rv", "before"), p.RecoverReady)
        finally:
            b.close()
        gate.set()
        wait_until(lambda: synced(hub, "rv"), 20, "the resync")
        a.expect_ack(a.checkpoint("after"))
        pts = hub.store.window.points(vol)
        assert [c["name"] for c in pts["checkpoints"]] == ["before", "after"]
        assert [c["name"] for c in pts["unrecoverable"]] == ["during"]
        assert "resync" in pts["unrecoverable"][0]["reason"]
        assert pts["resyncs"] and pts["resyncs"][0]["consistent_from_seq"] is not None
        seq, _ = hub.store.window.resolve_point(vol, "after")
        assert hub.store.window.read_at(vol, seq, 0, 2 * MiB) == bytes(mv.buf)
        assert "not recoverable" in rephub.format_points(pts)
    finally:
        gate.set()
        for t in a.holders:
            t.join(10)
        a.close()


def test_only_the_owner_or_an_allowed_agent_may_recover(hubenv):
    hub, secrets = hubenv
    a = connect(hub, secrets)
    try:
        a.attach("ov", MemVolume(MiB, data=os.urandom(MiB)))
        wait_until(lambda: synced(hub, "ov"), 20, "first sync")
        b = connect(hub, secrets, "a2")
        try:
            reply = open_session(b, "ov", "latest")
            assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.NOT_OWNER
            reply = open_session(b, "nosuch", "latest")
            assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.NO_SUCH_VOLUME
        finally:
            b.close()
        # Two sessions of the allowed agent, one per connection, on two volumes.
        a.attach("ov2", MemVolume(MiB))
        wait_until(lambda: synced(hub, "ov2"), 20, "first sync")
        r1, r2 = connect(hub, secrets, "rec"), connect(hub, secrets, "rec")
        try:
            assert isinstance(open_session(r1, "ov", "latest"), p.RecoverReady)
            assert isinstance(open_session(r2, "ov2", "latest"), p.RecoverReady)
            busy = open_session(r2, "ov", "latest")
            assert isinstance(busy, p.Error) and busy.code == p.ErrorCode.BUSY
            assert not r1.closed.is_set(), "a second connection of rec cut off the first"
        finally:
            r1.close()
            r2.close()
        wait_until(lambda: not hub.recovery.sessions, 10, "sessions closed with their connections")
    finally:
        a.close()


def test_overlay_matches_a_bytearray_model(tmp_path):
    size = 1 * MiB
    rng = random.Random(5)
    base = bytes(rng.randrange(256) for _ in range(4096)) * (size // 4096)
    model = bytearray(base)
    ov = rephub.Overlay(str(tmp_path / "ov"), size)
    try:
        for i in range(300):
            off = rng.randrange(0, size - 1)
            n = rng.randrange(1, min(size - off, 70000) + 1)
            if rng.random() < 0.3:
                ov.write(off, n, None)
                model[off:off + n] = bytes(n)
            else:
                data = bytes([i % 255 + 1]) * n
                ov.write(off, n, data)
                model[off:off + n] = data
            starts = [e[0] for e in ov.extents]
            assert starts == sorted(starts) and all(
                a[1] <= b[0] for a, b in zip(ov.extents, ov.extents[1:]))
        for _ in range(50):
            off = rng.randrange(0, size - 1)
            n = rng.randrange(1, size - off + 1)
            got = ov.lay_over(base[off:off + n], off, n)
            assert (got if got is not None else bytes(n)) == bytes(model[off:off + n])
    finally:
        ov.discard()
    assert not os.path.exists(tmp_path / "ov")


def test_leftover_overlays_are_discarded_at_start(tmp_path):
    agents = str(tmp_path / "agents")
    make_agents_file(agents, "a1")
    leftover = tmp_path / "data" / rephub.SCRATCH_DIR / "7-deadbeef"
    leftover.mkdir(parents=True)
    (leftover / "overlay").write_bytes(b"\x5a" * 4096)
    hub = rephub.Hub(str(tmp_path / "data"), agents)
    hub.start()
    try:
        assert not (tmp_path / "data" / rephub.SCRATCH_DIR).exists()
    finally:
        hub.shutdown(grace=5)


def test_interrupted_promotion_is_rolled_back_at_open(hubenv, monkeypatch):
    hub, secrets = hubenv
    mv = MemVolume(MiB, data=os.urandom(MiB))
    a = connect(hub, secrets)
    try:
        vid, _ = a.attach("pv", mv)
        wait_until(lambda: synced(hub, "pv"), 20, "first sync")
        a.expect_ack(a.checkpoint("p"))
        at_point = bytes(mv.buf)
        a.expect_ack(a.write(vid, 0, b"\x07" * 3 * CHUNK))
        a.expect_ack(a.zero(vid, 5 * CHUNK, CHUNK))
        monkeypatch.setattr(rephub.RecoveryWindow, "roll_back",
                            lambda self, vol: (_ for _ in ()).throw(OSError("crash")))
        with pytest.raises(OSError):
            hub.recovery.promote("pv", "p")
        reply = request(a, p.Write(request_id=a.request_id(), volume=vid, offset=0,
                                   data=b"\x08" * 512))
        assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.ROLE
        assert "promoted" in reply.message
    finally:
        a.close()
    monkeypatch.undo()
    data_dir = hub.store.dir
    hub.shutdown(grace=5)
    store = rephub.VolumeStore(data_dir)
    store.open()  # finishes the roll back
    try:
        vol = store.volume("pv")
        assert all(pr["rolled_back"] for pr in vol.meta["promotions"])
        with open(os.path.join(vol.dir, "replica"), "rb") as f:
            assert f.read() == at_point
        seq, _ = store.window.resolve_point(vol, "latest")
        assert store.window.read_at(vol, seq, 0, MiB) == at_point
    finally:
        store.close()
    hub.listener = None  # already shut down; the fixture's shutdown is a no-op


def test_promote_cli_offline_and_release(tmp_path):
    """``rephub.py promote`` with no hub running, then points, export, release."""
    import subprocess
    import sys
    agents = str(tmp_path / "agents")
    secrets = make_agents_file(agents, "a1")
    data = str(tmp_path / "data")
    hub = rephub.Hub(data, agents)
    hub.start()
    try:
        mv = MemVolume(MiB, data=os.urandom(MiB))
        with connect(hub, secrets) as a:
            vid, _ = a.attach("cv", mv)
            wait_until(lambda: synced(hub, "cv"), 20, "first sync")
            a.expect_ack(a.checkpoint("keep"))
            at_keep = bytes(mv.buf)
            a.expect_ack(a.write(vid, CHUNK, b"\x09" * CHUNK))
            a.expect_ack(a.checkpoint("later"))
            later = bytes(mv.buf)
    finally:
        hub.shutdown(grace=5)

    def cli(*argv):
        return subprocess.run([sys.executable, "rephub.py", *argv], cwd=rephub.os.path.dirname(
            rephub.__file__), capture_output=True, text=True, timeout=60)
    out = cli("promote", "--data", data, "cv", "--at", "keep")
    assert out.returncode == 0 and "promoted cv at keep" in out.stdout, out.stderr
    pts = cli("points", "--data", data, "cv").stdout
    assert "promoted at keep" in pts and "checkpoint later" in pts and "set aside" in pts, pts
    exp = str(tmp_path / "x.raw")
    assert cli("export", "--data", data, "cv", "--at", "latest", "-o", exp).returncode == 0
    assert open(exp, "rb").read() == at_keep
    assert cli("export", "--data", data, "cv", "--at", "later", "--set-aside",
               "-o", exp).returncode == 0
    assert open(exp, "rb").read() == later
    out = cli("release", "--data", data, "cv")
    assert out.returncode == 0 and "released" in out.stdout
    assert "(released)" in cli("points", "--data", data, "cv").stdout


def test_a_promotion_is_persisted_outside_the_journal_lock_and_a_failed_one_changes_nothing(
        hubenv, monkeypatch):
    """While a promotion's metadata is written (an fsync), the journal takes
    and ACKs other records, and the volume's protected writes are already
    refused (ROLE).  If that write fails, the promotion fails, the volume
    stays protected and takes its agent's writes again."""
    hub, secrets = hubenv
    a = connect(hub, secrets)
    try:
        vid, _ = a.attach("pv", MemVolume(MiB, data=os.urandom(MiB)))
        oid, _ = a.attach("ov", MemVolume(MiB))
        wait_until(lambda: synced(hub, "pv") and synced(hub, "ov"), 20, "first syncs")
        a.expect_ack(a.checkpoint("p"))
        vol = hub.store.volume("pv")
        writing, release = threading.Event(), threading.Event()
        real_update = rephub.Volume.update

        def failing_update(self, **changes):
            if self is vol and changes.get("role") == rephub.Role.PROMOTED.value:
                writing.set()
                assert release.wait(20)
                raise rephub.JournalRefused("metadata.json: No space left on device")
            return real_update(self, **changes)
        monkeypatch.setattr(rephub.Volume, "update", failing_update)
        outcome = {}

        def promote():
            try:
                outcome["result"] = hub.recovery.promote("pv", "p")
            except p.ReplicationError as err:
                outcome["error"] = err
        t = threading.Thread(target=promote, name="promote", daemon=True)
        t.start()
        try:
            assert writing.wait(20), "the promotion never wrote its metadata"
            a.expect_ack(a.write(oid, 0, b"o" * 4096))  # journaled and durable meanwhile
            reply = request(a, p.Write(request_id=a.request_id(), volume=vid, offset=0,
                                       data=b"x" * 4096))
            assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.ROLE, reply
        finally:
            release.set()
            t.join(20)
        assert "No space left" in str(outcome.get("error")), outcome
        assert vol.role is rephub.Role.PROTECTED and not vol.meta.get("promotions")
        a.expect_ack(a.write(vid, 0, b"y" * 4096))
    finally:
        a.close()

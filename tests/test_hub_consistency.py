"""The hub never calls a replica consistent, or offers a point, that lacks writes.

A resync the hub began ends only when a job that covered everything it owed
completed (SY-1): an agent that answers the sync's DIRTY_QUERY with ERROR,
then reports a few unsent regions, must not get the volume declared
consistent.  Points inside an unfinished resync are refused, ``latest``
included, naming the newest consistent point; checkpoint names are unique.
"""

from __future__ import annotations

import os
import random
import threading

import pytest

import protocol as p
import rephub
from hubtools import AgentError, MemVolume, TestAgent, wait_detached, wait_until

MiB = 1024 * 1024


class RefusingAgent(TestAgent):
    """Answers every DIRTY_QUERY with ERROR, as a misconfigured agent might."""

    __test__ = False
    code = p.ErrorCode.NO_SUCH_VOLUME

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.dirty_queries = 0

    def on_DIRTY_QUERY(self, msg: p.DirtyQuery) -> None:
        self.dirty_queries += 1
        self.send(p.Error(request_id=msg.request_id, code=self.code,
                          failed_type=msg.TYPE, message="no such volume here"))


def replica(hub, name: str) -> bytes:
    hub.store.applier.wait_applied(hub.store.journal.durable_seq)
    with open(os.path.join(hub.store.dir, "volumes", name, "replica"), "rb") as f:
        return f.read()


@pytest.mark.parametrize("code", [p.ErrorCode.NO_SUCH_VOLUME, p.ErrorCode.IO_ERROR])
def test_an_aborted_dirty_resync_is_never_declared_done(hub_a1, code):
    hub, secret = hub_a1
    rng = random.Random(15)
    mv = MemVolume(2 * MiB, rng.randbytes(2 * MiB))
    with TestAgent(hub.address, "a1", secret).connect() as agent:
        agent.attach("v", mv)
        wait_until(lambda: hub.store.volume("v").state == rephub.VolState.CONSISTENT, 20,
                   "the initial sync")
    vol = hub.store.volume("v")
    wait_detached(hub, "v")
    # Written while disconnected: the agent has it marked.
    mv.write(0, b"\x11" * 65536)
    mv.dirty = [(0, 65536)]

    RefusingAgent.code = code
    with RefusingAgent(hub.address, "a1", secret).connect() as agent:
        vid, plan = agent.attach("v", mv, state=p.VolumeState.DIRTY)
        assert plan == p.SyncPlan.DIRTY
        wait_until(lambda: agent.dirty_queries == 1 and vol.sync is None, 20,
                   "the DIRTY sync to give up")
        assert vol.state == rephub.VolState.SYNCING
        # One more write and an unsolicited DIRTY_MAP for another region.
        agent.expect_ack(agent.write(vid, MiB, b"\x22" * 65536))
        mv.write(MiB + 65536, b"\x33" * 65536)
        agent.send(p.DirtyMap(request_id=0, volume=vid, extents=[(MiB + 65536, 65536)]))
        # The hub redoes the whole DIRTY plan (another DIRTY_QUERY), which fails again.
        wait_until(lambda: agent.dirty_queries == 2 and vol.sync is None, 20,
                   "the DIRTY plan to be redone in full")
        assert vol.state == rephub.VolState.SYNCING, "declared consistent after an abort"
        with pytest.raises(p.RequestError, match="is resyncing") as info:
            hub.store.window.resolve_point(vol, "latest")
        assert info.value.code == p.ErrorCode.INCONSISTENT
        assert "the newest consistent point is seq" in str(info.value)
        assert "latest: not recoverable now" in rephub.format_points(hub.store.window.points(vol))
        problem = hub.store.window.seq_problem(vol, hub.store.journal.durable_seq)
        assert "inside a resync" in problem and "newest consistent point before it" in problem

    # A working agent finishes it: now, and only now, consistent and identical.
    wait_detached(hub, "v")
    mv.dirty = [(0, 65536), (MiB + 65536, 65536)]
    with TestAgent(hub.address, "a1", secret).connect() as agent:
        _, plan = agent.attach("v", mv, state=p.VolumeState.CLEAN)
        assert plan == p.SyncPlan.DIRTY, "an unfinished DIRTY sync must be redone"
        wait_until(lambda: vol.state == rephub.VolState.CONSISTENT and vol.sync is None, 20,
                   "the resync")
    assert replica(hub, "v") == bytes(mv.buf)
    hub.store.window.resolve_point(vol, "latest")
    assert "latest: recoverable" in rephub.format_points(hub.store.window.points(vol))


def test_checkpoint_names_are_unique(hub_a1):
    hub, secret = hub_a1
    mv = MemVolume(MiB)
    with TestAgent(hub.address, "a1", secret).connect() as agent:
        agent.attach("v", mv)
        wait_until(lambda: hub.store.volume("v").state == rephub.VolState.CONSISTENT, 20,
                   "the initial sync")
        agent.expect_ack(agent.checkpoint("before-upgrade"))
        with pytest.raises(AgentError, match="INVALID") as info:
            agent.expect_ack(agent.checkpoint("before-upgrade"))
        assert "exists" in info.value.error.message
    with pytest.raises(p.RequestError, match="exists"):
        hub.checkpoint("v", "before-upgrade")
    names = [c[3] for c in hub.store.journal.checkpoints]
    assert names.count("before-upgrade") == 1


def test_a_recovery_test_by_the_same_agent_id_leaves_protection_alone(hub_a1):
    """README walkthrough step 6: ``repagent.py recover --test`` with the
    protected agent's own id must not close the protecting connection."""
    hub, secret = hub_a1
    mv = MemVolume(MiB, bytes(range(256)) * (MiB // 256))
    with TestAgent(hub.address, "a1", secret).connect() as protect:
        vid = protect.attach("v", mv)[0]
        wait_until(lambda: hub.store.volume("v").state == rephub.VolState.CONSISTENT, 20,
                   "the initial sync")
        with TestAgent(hub.address, "a1", secret).connect() as recovery:
            req = recovery.request_id()
            recovery.send(p.RecoverOpen(request_id=req, mode=p.RecoverMode.TEST, name="v",
                                        point="latest"))
            ready = recovery.wait_reply(req)
            assert isinstance(ready, p.RecoverReady), ready
            protect.expect_ack(protect.write(vid, 0, b"\x01" * 4096))   # while the test runs
            req = recovery.request_id()
            recovery.send(p.RRead(request_id=req, volume=ready.volume, offset=4096,
                                  length=4096))
            assert recovery.wait_reply(req).data == mv.read(4096, 4096)
        protect.expect_ack(protect.write(vid, 8192, b"\x02" * 4096))
        assert not protect.closed.is_set() and protect.goodbye is None
    assert replica(hub, "v") == bytes(mv.buf)


def test_two_hosts_with_one_agent_id_never_share_a_volume(hub_a1):
    """A cloned host: two connections of one agent id attach the same volume name
    from different disks, at the same moment, several times.  The volume is
    never attached to both; each take-over verifies against the new disk, and
    the replica ends equal to the disk of the connection that has it."""
    hub, secret = hub_a1
    rng = random.Random(152)
    disks = [MemVolume(MiB, rng.randbytes(MiB)) for _ in range(2)]
    with TestAgent(hub.address, "a1", secret).connect() as first:
        first.attach("v", disks[0])
        vol = hub.store.volume("v")
        wait_until(lambda: vol.state == rephub.VolState.CONSISTENT, 20, "the initial sync")
    winner = None
    for round_ in range(4):
        agents = [TestAgent(hub.address, "a1", secret).connect() for _ in disks]
        try:
            threads = [threading.Thread(target=lambda a=a, d=d: _attach_quietly(a, d))
                       for a, d in zip(agents, disks)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
            with hub.conn_lock:
                holders = [c for c in hub.connections if vol.id in c.attached.volumes]
            assert len(holders) <= 1, f"round {round_}: attached on {len(holders)} connections"
            wait_until(lambda: vol.sync is None and vol.attached_to is not None
                       and vol.state == rephub.VolState.CONSISTENT, 30, "the take-over's verify")
            holder = vol.attached_to
            winner = next(d for a, d in zip(agents, disks)
                          if a.sock.getsockname() == _peer_of(holder))
            assert replica(hub, "v") == bytes(winner.buf), f"round {round_}"
            loser = next(a for a, d in zip(agents, disks) if d is not winner)
            wait_until(loser.closed.is_set, 10, "the other connection to be closed")
        finally:
            for a in agents:
                a.close()
    assert winner is not None


def _attach_quietly(agent: TestAgent, disk: MemVolume) -> None:
    try:
        agent.attach("v", disk, state=p.VolumeState.CLEAN)
    except (AgentError, TimeoutError, OSError):
        pass   # the other connection took it over first and this one was closed


def _peer_of(conn) -> tuple[str, int]:
    host, port = conn.peer.rsplit(":", 1)
    return host, int(port)


def test_another_disk_under_the_same_name_is_refused_until_reseeded(hub_a1, tmp_path, capsys):
    """VO-8: a second agent with its own state (a cloned host, a copied
    configuration) attaches the same volume name from another disk.  It is
    refused while the first keeps replicating; after ``rephub.py reseed`` its
    next ATTACH is verified and the replica becomes that disk."""
    hub, secret = hub_a1
    rng = random.Random(158)
    first_disk, second_disk = (MemVolume(MiB, rng.randbytes(MiB)) for _ in range(2))
    first = TestAgent(hub.address, "a1", secret).connect()
    second = TestAgent(hub.address, "a1", secret).connect()
    try:
        vid, _ = first.attach("v", first_disk, generation=b"\x01" * 16)
        vol = hub.store.volume("v")
        wait_until(lambda: vol.state == rephub.VolState.CONSISTENT and vol.sync is None, 20,
                   "the initial sync")
        with pytest.raises(AgentError) as refused:
            second.attach("v", second_disk, generation=b"\x02" * 16)
        err = refused.value.error
        assert err.code == p.ErrorCode.NOT_OWNER
        assert "bound to another disk" in err.message and "rephub.py reseed v" in err.message
        first_disk.write(0, b"\x33" * 4096)
        first.expect_ack(first.write(vid, 0, b"\x33" * 4096))
        assert vol.attached_to is not None and not first.closed.is_set()
        assert replica(hub, "v") == bytes(first_disk.buf), "the refused disk changed nothing"

        assert rephub.main(["reseed", "--data", hub.store.dir, "v"]) == 0
        assert "may bring another disk" in capsys.readouterr().out
        wait_until(second.closed.is_set, 10, "the refused connection closed to attach again")
        first.close()
        again = TestAgent(hub.address, "a1", secret).connect()
        try:
            _, plan = again.attach("v", second_disk, generation=b"\x02" * 16)
            assert plan == p.SyncPlan.VERIFY
            wait_until(lambda: vol.state == rephub.VolState.CONSISTENT and vol.sync is None, 20,
                       "the re-seed's verify")
            assert replica(hub, "v") == bytes(second_disk.buf)
            assert not vol.meta["reseed"], "a re-seed admits one new disk, not every one"
        finally:
            again.close()
    finally:
        first.close()
        second.close()

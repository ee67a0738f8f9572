"""rephub: a sync job's life against a reconnecting agent.

on_ATTACH creates the volume's SyncJob, sends ATTACHED and only then starts
the job (so its requests follow ATTACHED on the wire).  An agent that
reconnects in that gap makes the new connection detach the volume from the
old one, which stops the job before it ever started: that must not fail the
new connection.
"""

from __future__ import annotations

import protocol as p
import rephub
from hubtools import MemVolume, TestAgent, wait_until


def test_a_reconnect_detaching_a_sync_not_started_yet_is_served(hub_a1, monkeypatch):
    hub, secret = hub_a1
    vol = MemVolume(1 << 20)
    start = rephub.SyncJob.start
    held = []

    def start_later(job):           # the first job stays in the gap between ATTACHED and start
        if not held:
            held.append(job)
            return
        start(job)

    monkeypatch.setattr(rephub.SyncJob, "start", start_later)
    first = TestAgent(hub.address, "a1", secret).connect()
    second = None
    try:
        vid, plan = first.attach("gap", vol)
        assert plan == p.SyncPlan.FULL
        wait_until(lambda: held, 10, "on_ATTACH to reach the job's start")
        assert held[0].ident is None
        second = TestAgent(hub.address, "a1", secret).connect()
        vid, plan = second.attach("gap", vol)
        assert plan == p.SyncPlan.FULL
        wait_until(lambda: hub.store.volume("gap").state == rephub.VolState.CONSISTENT, 20,
                   "the sync on the new connection")
        assert held[0].stop_event.is_set()
    finally:
        first.close()
        if second is not None:
            second.close()

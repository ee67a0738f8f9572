"""Hub direction, PROTOCOL.md "Fail-back": the suite plays the original agent
(and the recovery agent) and judges the hub over the wire.

A fail-back starts with the hub's operator; the suite can only start one on
the reference hub (``rephub.py failback --yes``): against another hub the
tests that need one skip, saying so.  The rest (DEMOTED attach with and
without the feature, writes refused on a DEMOTED volume) is wire only.

The story: the suite protects a volume, takes a checkpoint, writes once more
(that record is set aside by the promotion), then, as the recovery agent,
fails over at the checkpoint and writes at the recovery site; at the old
site it writes once more without sending it (a late write, in its dirty
map).  It comes back offering FAILBACK and the hub must PUT exactly where
the two sides may differ, hold FAILBACK_END until every PUT is ACKed, fence
and then close the recovery session, and take writes again from the frame
after FAILBACK_END's ACK.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from cf_codec import CODE_NAMES, ENUMS, FLAG_ZERO, Msg, msg
from cf_peers import MemVolume, SpecAgent, wait_until

clause = pytest.mark.clause
ROOT = Path(__file__).resolve().parents[2]
PLAN = ENUMS["plan"]
FAILBACK = 1 << 1      # PROTOCOL.md "Feature bits"
SIZE = 1 << 20
CHUNK = 65536
T = 10.0


def vname(tag: str) -> str:
    return f"cf-{tag}-{uuid.uuid4().hex[:8]}"


#: PROTOCOL.md "Feature bits" and GoodbyeCode ([LV-5]).
GOODBYE_CODE, FAILED_BACK = 1 << 2, 2


def connect(hub, codec, features: int = 0) -> SpecAgent:
    return SpecAgent(hub.address, hub.agent_id, hub.secret, codec, features=features)


def error_of(m) -> str:
    assert isinstance(m, Msg) and m.type == "ERROR", f"expected ERROR, got {m!r}"
    return CODE_NAMES.get(int(m.code), str(m.code))


def granted(a: SpecAgent) -> int:
    return int(a.handshake["reply"].features)


def operator_failback(hub, name: str):
    """Start the hub operator's fail-back of ``name`` (reference hub only)."""
    data = getattr(hub, "dir", None)
    if data is None:
        pytest.skip("a fail-back is started by the hub's operator: the suite drives only the "
                    "reference hub's (rephub.py failback)")
    return subprocess.Popen([sys.executable, str(ROOT / "rephub.py"), "failback", "--data",
                             str(Path(data) / "data"), name, "--to", hub.agent_id, "--yes"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


class Scene:
    """A volume of the suite's agent, promoted at checkpoint ``cp`` by a FAILOVER
    session (``rec``, ``sid``); ``aside``: the write after ``cp`` (set aside),
    ``recovery``: the recovery site's write, ``late``: the old site's unsent one."""

    aside = (2 * CHUNK, CHUNK)
    recovery = (6 * CHUNK, 2 * CHUNK)
    late = (12 * CHUNK, CHUNK)

    def __init__(self, hub, codec):
        self.hub, self.codec = hub, codec
        self.vol = MemVolume(vname("fb"), SIZE, CHUNK, data=os.urandom(SIZE))
        a = connect(hub, codec)
        try:
            att = a.attach(self.vol, "CLEAN")
            assert att.type == "ATTACHED" and att.plan == PLAN["FULL"], att.describe()
            wait_until(lambda: a.synced_cover(self.vol), T, "SYNCED over the new volume")
            point = vname("cp")
            assert a.request(msg("CHECKPOINT", name=point)).type == "ACK"
            self.model = bytearray(self.vol.buf)        # the volume at the point
            off, n = self.aside
            assert a.wait_answer(a.write(self.vol, off, b"\xa5" * n)).type == "ACK"
        finally:
            a.close()
        self.rec = connect(hub, codec, GOODBYE_CODE)   # the session's end has a code [LV-5]

        def ready():
            m = self.rec.request(msg("RECOVER_OPEN", mode="FAILOVER", name=self.vol.name,
                                     point=point))
            assert m.type in ("RECOVER_READY", "ERROR"), m.describe()
            return m if m.type == "RECOVER_READY" else None
        self.sid = wait_until(ready, T, "RECOVER_READY (FAILOVER)").volume
        off, n = self.recovery
        assert self.rwrite(off, b"\x5a" * n).type == "ACK"
        self.model[off:off + n] = b"\x5a" * n
        off, n = self.late
        self.vol.buf[off:off + n] = b"\x3c" * n           # never sent

    def rwrite(self, off: int, data: bytes) -> Msg:
        return self.rec.request(msg("RWRITE", volume=self.sid, offset=off, data=data))

    def come_back(self, features: int = FAILBACK) -> tuple[SpecAgent, Msg]:
        d = connect(self.hub, self.codec, features)
        off, n = self.late
        d.answer_override["DIRTY_QUERY"] = lambda q: d.send(
            msg("DIRTY_MAP", request_id=q.request_id, volume=q.volume, extents=[(off, n)]))
        return d, d.attach(self.vol, "DIRTY")


@clause("FB-1", "VN-3")
def test_demoted_attach_only_with_the_feature(hub, codec):
    sc = Scene(hub, codec)
    try:
        plain, att = sc.come_back(features=0)
        try:
            assert granted(plain) == 0, "a feature not offered is never granted [VN-3]"
            assert error_of(att) == "ROLE", "promoted volume, FAILBACK not granted [FB-1]"
        finally:
            plain.close()
        d, att = sc.come_back()
        try:
            if not granted(d) & FAILBACK:
                pytest.skip("this hub does not grant FAILBACK")
            assert att.type == "ATTACHED" and att.plan == PLAN["DEMOTED"], \
                f"promoted volume, FAILBACK granted: expected DEMOTED, got {att.describe()}"
            other = MemVolume(vname("nd"), SIZE, CHUNK)
            d.hold_reads.set()
            att = d.attach(other, "CLEAN")
            assert att.type == "ATTACHED" and att.plan != PLAN["DEMOTED"], \
                "a volume that is not promoted is never DEMOTED [FB-1]"
        finally:
            d.close()
    finally:
        sc.rec.close()


@clause("FB-2")
def test_demoted_volume_refuses_writes(hub, codec):
    sc = Scene(hub, codec)
    d, att = sc.come_back()
    try:
        if att.type != "ATTACHED" or att.plan != PLAN["DEMOTED"]:
            pytest.skip(f"this hub does not attach DEMOTED ({att.describe()})")
        vid = sc.vol.volume_id
        assert error_of(d.request(msg("WRITE", volume=vid, offset=0, data=b"\x01" * 512))) \
            == "ROLE", "[FB-2]"
        assert error_of(d.request(msg("ZERO", volume=vid, offset=0, length=512))) == "ROLE", \
            "[FB-2]"
    finally:
        d.close()
        sc.rec.close()


@clause("FB-8", "FB-10", "FB-12", "LV-5")
def test_failback_puts_fence_and_role_return(hub, codec):
    sc = Scene(hub, codec)
    d, att = sc.come_back()
    proc = None
    try:
        assert att.type == "ATTACHED" and att.plan == PLAN["DEMOTED"], att.describe()
        vid = sc.vol.volume_id
        lock = threading.Lock()
        puts, held, events = [], [], []
        after_end = {}

        def on_put(m):
            with lock:
                puts.append((m.offset, m.length))
                held.append(m)
                events.append("put")

        def ack_held():
            with lock:
                todo, held[:] = list(held), []
            for m in todo:
                data = bytes(m.length) if m.flags & FLAG_ZERO else bytes(m.data)
                sc.vol.buf[m.offset:m.offset + m.length] = data
                with lock:
                    events.append("ack")
                d.send(msg("ACK", request_id=m.request_id))

        def on_end(m):
            with lock:
                events.append(f"end:{m.outcome}")
            d.send(msg("ACK", request_id=m.request_id))
            if int(m.outcome) == ENUMS["outcome"]["DONE"]:
                after_end["req"] = d.write(sc.vol, 15 * CHUNK, b"\x77" * 4096)

        d.answer_override.update({
            "FAILBACK_BEGIN": lambda m: d.send(msg("ACK", request_id=m.request_id)),
            "PUT": on_put, "FAILBACK_END": on_end})
        proc = operator_failback(hub, sc.vol.name)
        wait_until(lambda: puts, 30, "the first PUT")
        m = sc.rwrite(0, b"\x99" * 4096)
        assert error_of(m) == "ROLE", "RWRITE during a fail-back is refused [FB-12]"

        def covered(lo, n):
            with lock:
                spans = sorted((o, o + k) for o, k in puts)
            end = lo
            for s, e in spans:
                if s <= end < e:
                    end = e
            return end >= lo + n
        wait_until(lambda: all(covered(*r) for r in (sc.aside, sc.recovery, sc.late)), T,
                   "PUTs over the set-aside, recovery-site and late-write regions [FB-8]")
        with pytest.raises(TimeoutError):
            d.wait_for(lambda f: isinstance(f, Msg) and f.type == "FAILBACK_END", 0.5,
                       "FAILBACK_END")
        assert not [e for e in events if e.startswith("end")], \
            "FAILBACK_END before every PUT was ACKed [FB-8]"
        while proc.poll() is None and not after_end:   # ACK every PUT, later ones too
            ack_held()
            wait_until(lambda: after_end or held or proc.poll() is not None, 30,
                       "more PUTs or FAILBACK_END")
        assert "req" in after_end, f"no FAILBACK_END(DONE): {proc.communicate()}"
        ack = d.wait_answer(after_end["req"])
        assert ack.type == "ACK", \
            f"a WRITE right after FAILBACK_END's ACK must be taken [FB-10], got {ack.describe()}"
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        sc.model[15 * CHUNK:15 * CHUNK + 4096] = b"\x77" * 4096
        assert bytes(sc.vol.buf) == bytes(sc.model), \
            "after the PUTs the old site equals the volume's new history [FB-8]"
        wait_until(lambda: sc.rec.closed.is_set(), T, "the recovery connection closed")
        byes = [f for f in sc.rec.received if isinstance(f, Msg) and f.type == "GOODBYE"]
        assert byes, "the recovery session's connection ends with GOODBYE [FB-12]"
        assert byes[0].code == FAILED_BACK, f"{byes[0]}: code FAILED_BACK [LV-5]"
        assert d.wait_answer(d.write(sc.vol, 0, b"\x78" * 512)).type == "ACK", "[FB-10]"
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
        d.close()
        sc.rec.close()


@clause("FB-9")
def test_late_writes_reported_set_aside_kept():
    pytest.skip("not observable on the wire: the hub reports the late writes to its operator "
                "and keeps its set-aside records (rephub: tests/test_failback_hub.py checks "
                "both)")

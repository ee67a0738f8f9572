"""Fail-back inside the hub, without QEMU: in-process ``rephub.Hub``, ``TestAgent``s.

The story of every test: agent a1 protects volume ``fv`` (4 MiB), checkpoint
``p``, then writes more (those records are set aside when ``rec`` fails over
at ``p``); ``rec`` writes at the recovery site; the old site also has late
writes the hub never received (its dirty map).  Then a1 comes back with
FAILBACK offered, attaches DEMOTED, and ``rephub.py failback`` (the control
command, or the CLI) brings the volume home: exact PUT ranges and bytes, the
late writes saved before being overwritten, the recovery session fenced then
closed with GOODBYE, writes accepted from the frame after FAILBACK_END's ACK.
Refusals, a declined report, and an agent error mid-way leave the volume
promoted with nothing lost.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading

import pytest

import protocol as p
import rephub
from hubtools import MemVolume, TestAgent, send_wrong_answers, wait_until

KiB, MiB = 1024, 1024 * 1024
CHUNK = 64 * KiB
SIZE = 4 * MiB
NAME = "fv"

# (offset, length, byte or None for zeroes)
ASIDE = [(256 * KiB, 64 * KiB, 0x11), (3 * MiB, 64 * KiB, None)]
RECOVERY = [(1 * MiB, 1536 * KiB, 0x22), (3584 * KiB, 128 * KiB, None),
            (288 * KiB, 64 * KiB, 0x33)]
LATE = [(512 * KiB, 64 * KiB, 0x44), (3 * MiB + 64 * KiB, 64 * KiB, 0x55)]
#: Merged regions of ASIDE, RECOVERY and LATE: what the hub must send.
DELTA = [(256 * KiB, 96 * KiB), (512 * KiB, 64 * KiB), (1 * MiB, 1536 * KiB),
         (3 * MiB, 128 * KiB), (3584 * KiB, 128 * KiB)]


class FailbackAgent(TestAgent):
    """An original-site agent that offers FAILBACK and plays the agent's side of
    PROTOCOL.md "Fail-back" on its MemVolume: BEGIN (or refuse it), PUTs
    (optionally held, or one refused), END (DONE clears its dirty map)."""

    features = p.Feature.FAILBACK

    def __init__(self, *args, accept: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.accept = accept
        self.put_lock = threading.Lock()
        self.events: list[tuple] = []     # ("put", off, len, zero) / ("ack", off) / ("end", outcome)
        self.hold = False                 # PUTs recorded, ACKed only by release()
        self.held: list[p.Put] = []
        self.fail_put_at: int | None = None  # answer the n-th PUT (from 1) with ERROR
        self.write_after_end: tuple | None = None  # (vid, offset, data): a WRITE right after END's ACK
        self.write_after_end_req = 0

    def puts(self) -> list[tuple]:
        with self.put_lock:
            return [e[1:] for e in self.events if e[0] == "put"]

    def ends(self) -> list:
        with self.put_lock:
            return [e[1] for e in self.events if e[0] == "end"]

    def on_FAILBACK_BEGIN(self, msg: p.FailbackBegin) -> None:
        if not self.accept:
            self.send(p.Error(request_id=msg.request_id, code=p.ErrorCode.NOT_ALLOWED,
                              failed_type=msg.TYPE, message="fail-back not accepted: stop the "
                              "VM, then restart repagent.py protect with --accept-failback"))
            return
        self.send(p.Ack(request_id=msg.request_id))

    def on_PUT(self, msg: p.Put) -> None:
        with self.put_lock:
            self.events.append(("put", msg.offset, msg.length, msg.is_zero))
            n = sum(e[0] == "put" for e in self.events)
            if self.hold:
                self.held.append(msg)
                return
        if n == self.fail_put_at:
            self.send(p.Error(request_id=msg.request_id, code=p.ErrorCode.IO_ERROR,
                              failed_type=msg.TYPE, message="nbd write failed: EIO"))
            return
        self._apply_put(msg)

    def _apply_put(self, msg: p.Put) -> None:
        vol = self.volumes[msg.volume]
        vol.dirty = covered(vol.dirty + [(msg.offset, msg.length)])  # marked first (FB-6)
        vol.write(msg.offset, bytes(msg.length) if msg.is_zero else bytes(msg.data))
        with self.put_lock:
            self.events.append(("ack", msg.offset))
        self.send(p.Ack(request_id=msg.request_id))

    def release(self) -> None:
        with self.put_lock:
            self.hold = False
            held, self.held = self.held, []
        for msg in held:
            self._apply_put(msg)

    def on_FAILBACK_END(self, msg: p.FailbackEnd) -> None:
        with self.put_lock:
            self.events.append(("end", msg.outcome))
        if msg.outcome == p.FailbackOutcome.DONE:
            self.volumes[msg.volume].dirty = []
            if self.write_after_end is not None:
                vid, off, data = self.write_after_end
                self.send(p.Ack(request_id=msg.request_id))  # the WRITE follows at once
                self.write_after_end_req = self.write(vid, off, data)
                return
        self.send(p.Ack(request_id=msg.request_id))


@pytest.fixture
def hubenv(hub_factory):
    """An in-process hub with agents a1, a2 and rec, which may recover a1's
    volumes: (hub, {agent: secret})."""
    hub = hub_factory("a1", "a2", "rec", recover={"rec": "a1"}, heartbeat=0.5)
    return hub, hub.secrets


def fill(length: int, byte) -> bytes | None:
    return None if byte is None else bytes([byte]) * length


def request(agent: TestAgent, msg: p.Message) -> p.Message:
    agent.send(msg)
    return agent.wait_reply(msg.request_id)


class Scene:
    """a1 protected ``fv``, failed over to ``rec`` at ``p``; late writes at the old site."""

    def __init__(self, hub, secrets):
        self.hub, self.secrets = hub, secrets
        rng = random.Random(8)
        self.initial = bytes(rng.randrange(256) for _ in range(4096)) * (SIZE // 4096)
        self.mv = MemVolume(SIZE, data=self.initial)
        self.gen = os.urandom(16)
        a = TestAgent(hub.address, "a1", secrets["a1"]).connect()
        try:
            vid, _ = a.attach(NAME, self.mv, generation=self.gen)
            wait_until(lambda: self.vol.state == rephub.VolState.CONSISTENT
                       and self.vol.sync is None, 20, "first sync")
            a.expect_ack(a.checkpoint("p"))
            for off, n, byte in ASIDE:
                a.expect_ack(a.zero(vid, off, n) if byte is None
                             else a.write(vid, off, fill(n, byte)))
            a.expect_ack(a.checkpoint("aside"))
            self.aside_state = bytes(self.mv.buf)
        finally:
            a.close()
        self.rec = TestAgent(hub.address, "rec", secrets["rec"])
        self.rec.features = p.Feature.GOODBYE_CODE  # the end of the session has a code
        self.rec.connect()
        ready = request(self.rec, p.RecoverOpen(request_id=self.rec.request_id(),
                                                mode=p.RecoverMode.FAILOVER, name=NAME,
                                                point="p"))
        assert isinstance(ready, p.RecoverReady), ready
        self.sid = ready.volume
        self.model = bytearray(self.initial)   # the volume's new history
        for off, n, byte in RECOVERY:
            self.rwrite(off, n, byte)
        for off, n, byte in LATE:                # never sent: the old site's dirty map
            self.mv.write(off, fill(n, byte))
        self.mv.dirty = [(off, n) for off, n, _ in LATE]
        self.old_site = bytes(self.mv.buf)

    @property
    def vol(self) -> rephub.Volume:
        return self.hub.store.volume(NAME)

    def rwrite(self, off: int, n: int, byte) -> p.Message:
        data = fill(n, byte)
        msg = (p.RWrite(request_id=self.rec.request_id(), volume=self.sid, offset=off,
                        length=n, flags=p.FLAG_ZERO) if data is None else
               p.RWrite(request_id=self.rec.request_id(), volume=self.sid, offset=off,
                        data=data))
        reply = request(self.rec, msg)
        if isinstance(reply, p.Ack):
            self.model[off:off + n] = bytes(n) if data is None else data
        return reply

    def come_back(self, state=p.VolumeState.DIRTY, generation=None, agent=None,
                  **kw) -> FailbackAgent:
        """a1 (a FailbackAgent, or an ``agent`` class derived from it) attaches DEMOTED."""
        fa = (agent or FailbackAgent)(self.hub.address, "a1", self.secrets["a1"], **kw).connect()
        assert fa.granted & p.Feature.FAILBACK
        vid, plan = fa.attach(NAME, self.mv, state=state,
                              generation=self.gen if generation is None else generation)
        assert plan == p.SyncPlan.DEMOTED
        fa.vid = vid
        return fa

    def hub_volume(self) -> memoryview | bytes:
        store = self.hub.store
        seq, _ = store.window.resolve_point(self.vol, "latest")
        return store.window.read_at(self.vol, seq, 0, SIZE) or bytes(SIZE)


def run_failback(hub, confirm=True, on_report=None, to="a1"):
    """``{"cmd": "failback"}`` over the control socket in a thread; returns
    (thread, lines, outcome dict with "result" or "error")."""
    lines, outcome = [], {}

    def on_line(o):
        lines.append(o)
        if "report" in o:
            if on_report is not None:
                on_report(o["report"])
            return {"confirm": confirm() if callable(confirm) else confirm}
        return None

    def go():
        try:
            outcome["result"] = rephub.control_request(
                hub.store.dir, {"cmd": "failback", "volume": NAME, "to": to}, on_line=on_line)
        except rephub.CommandError as err:
            outcome["error"] = str(err)
    t = threading.Thread(target=go, name="failback-cli", daemon=True)
    t.start()
    return t, lines, outcome


def covered(ranges) -> list[tuple[int, int]]:
    """Merge (offset, length) ranges into (offset, length) extents."""
    return [(s, e - s) for s, e in rephub.merge_ranges((o, o + n) for o, n in ranges)]


def test_failback_happy_path(hubenv):
    hub, secrets = hubenv
    sc = Scene(hub, secrets)
    fa = sc.come_back()
    try:
        # FB-2: a DEMOTED volume takes no WRITE/ZERO.
        reply = request(fa, p.Write(request_id=fa.request_id(), volume=fa.vid, offset=0,
                                    data=b"\x66" * 512))
        assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.ROLE
        assert hub.status()["volumes"][0]["demoted"] is True
        fa.hold = True
        fa.write_after_end = (fa.vid, 3 * MiB + 512 * KiB, b"\x77" * 4096)
        seen_at_report = []
        t, lines, outcome = run_failback(
            hub, on_report=lambda r: seen_at_report.append((r, list(fa.puts()))))
        wait_until(lambda: fa.puts(), 20, "the first PUT")
        # FB-12: fenced from the first PUT: RWRITE refused, RREAD still served.
        reply = sc.rwrite(0, 4096, 0x99)
        assert isinstance(reply, p.Error) and reply.code == p.ErrorCode.ROLE
        assert "failing back to agent a1" in reply.message
        rread = request(sc.rec, p.RRead(request_id=sc.rec.request_id(), volume=sc.sid,
                                        offset=1 * MiB, length=4096))
        assert isinstance(rread, p.RReadReply) and bytes(rread.data) == b"\x22" * 4096
        st = hub.status()["volumes"][0]["failback"]
        assert st["phase"] == "applying" and st["to"] == "a1" and st["fenced"]
        assert "failing back" in rephub.format_status(hub.status())
        # FB-8: no FAILBACK_END while PUTs are un-ACKed.
        wait_until(lambda: len(fa.puts()) == 6, 20, "every PUT (6 pieces < the window)")
        assert fa.ends() == []
        fa.release()
        t.join(30)
        assert "result" in outcome, outcome
        res = outcome["result"]
    finally:
        fa.release()
    assert res["outcome"] == "done"

    # The report came before any PUT (FB-9) and says what is at stake.
    (report, puts_then), = seen_at_report
    assert puts_then == []
    assert report["late_writes"]["known"] is True
    assert report["late_writes"]["bytes"] == sum(n for _, n, _ in LATE)
    assert report["late_writes"]["extents"] == [[o, n] for o, n, _ in LATE]
    assert report["late_writes"]["image"] == os.path.join(res["late_writes_dir"],
                                                          rephub.LATE_WRITES_IMAGE)
    assert report["set_aside"]["records"] == len(ASIDE)
    assert report["set_aside"]["bytes"] == sum(n for _, n, _ in ASIDE)
    assert report["delta"]["extents"] == [[o, n] for o, n in DELTA]
    assert report["delta"]["bytes"] == sum(n for _, n in DELTA)
    phases = [o["phase"] for o in lines if "message" in o]
    assert phases == ["preparing", "collecting", "preserving", "confirming", "applying",
                      "applying", "finishing"], phases

    # Exactly the delta went out, in pieces of at most 1 MiB; zeroes as FLAG_ZERO.
    puts = [e for e in fa.events if e[0] == "put"]
    assert all(n <= rephub.FAILBACK_PIECE for _, _, n, _ in puts)
    assert covered((o, n) for _, o, n, _ in puts) == DELTA
    assert sum(n for _, _, n, _ in puts) == sum(n for _, n in DELTA) == res["sent_bytes"]
    assert res["sent_bytes"] <= 1.1 * res["delta_bytes"]
    assert [(o, n) for _, o, n, z in puts if z] == [(3584 * KiB, 128 * KiB)]
    # FB-8: FAILBACK_END(DONE) only after every PUT's ACK.
    kinds = [e[0] for e in fa.events]
    assert kinds.count("end") == 1 and kinds.index("end") > max(
        i for i, k in enumerate(kinds) if k == "ack")
    assert fa.ends() == [p.FailbackOutcome.DONE]

    # The old site now equals the volume's new history (plus the write after END).
    expected = bytearray(sc.model)
    expected[3 * MiB + 512 * KiB:3 * MiB + 516 * KiB] = b"\x77" * 4096
    fa.expect_ack(fa.write_after_end_req)   # FB-10: accepted from the frame after the ACK
    wait_until(lambda: sc.hub_volume() == bytes(expected), 20, "the WRITE after END journaled")
    assert bytes(fa.volumes[fa.vid].buf) == bytes(expected)

    # The late writes are saved, at their own offsets, in a sparse image.
    d = res["late_writes_dir"]
    assert d.startswith(sc.vol.dir) and os.path.basename(d) == "failback-1"
    img = open(os.path.join(d, rephub.LATE_WRITES_IMAGE), "rb").read()
    assert len(img) == SIZE
    want = bytearray(SIZE)
    for off, n, byte in LATE:
        want[off:off + n] = sc.old_site[off:off + n]
    assert img == bytes(want)
    info = json.load(open(os.path.join(d, rephub.LATE_WRITES_JSON)))
    assert info["extents"] == [[o, n] for o, n, _ in LATE] and info["agent"] == "a1"

    # The recovery session was closed with GOODBYE; its connection ends.
    wait_until(sc.rec.closed.is_set, 10, "the recovery connection closed")
    assert sc.rec.goodbye == f"volume {NAME} failed back to agent a1"
    assert sc.rec.goodbye_code == p.GoodbyeCode.FAILED_BACK, "PROTOCOL.md [LV-5]"
    assert hub.recovery.sessions == {}

    # The role is back; set-aside entries stay exportable; status says done.
    meta = sc.vol.meta
    assert meta["role"] == "protected" and meta["generation"] == sc.gen.hex()
    fb = meta["failbacks"][-1]
    assert fb["agent"] == "a1" and fb["delta_bytes"] == res["delta_bytes"]
    assert fb["late_writes"]["bytes"] == sum(n for _, n, _ in LATE) and fb["late_writes_dir"] == d
    assert all(pr["kept"] for pr in meta["promotions"])
    seq, _ = hub.store.window.resolve_point(sc.vol, "aside", set_aside=True)
    out = os.path.join(os.path.dirname(hub.store.dir), "aside.raw")
    hub.store.window.export_set_aside(sc.vol, seq, out)
    assert open(out, "rb").read() == sc.aside_state
    vst = hub.status()["volumes"][0]
    assert vst["role"] == "protected" and vst["failback"]["phase"] == "done"
    assert fa.volumes[fa.vid].dirty == []
    fa.close()


def test_refusals(hubenv):
    hub, secrets = hubenv
    a = TestAgent(hub.address, "a2", secrets["a2"]).connect()
    try:
        a.attach("other", MemVolume(MiB))
        wait_until(lambda: hub.store.volume("other").sync is None, 20, "first sync")
    finally:
        a.close()
    t, _, outcome = run_failback(hub)
    t.join(10)
    assert "NO_SUCH_VOLUME" in outcome["error"]
    with pytest.raises(p.RequestError, match="not promoted: nothing to fail back"):
        hub.failback("other", "a2", print, lambda r: True)
    sc = Scene(hub, secrets)
    with pytest.raises(p.RequestError, match="start repagent.py protect --accept-failback") \
            as err:
        hub.failback(NAME, "a1", print, lambda r: True)
    assert err.value.code == p.ErrorCode.BAD_PHASE
    with pytest.raises(p.RequestError, match="belongs to agent a1, not a2") as err:
        hub.failback(NAME, "a2", print, lambda r: True)
    assert err.value.code == p.ErrorCode.NOT_OWNER
    # FB-1: without the feature, the promoted volume's ATTACH is refused.
    plain = TestAgent(hub.address, "a1", secrets["a1"]).connect()
    try:
        assert plain.granted == 0
        with pytest.raises(Exception) as err:
            plain.attach(NAME, sc.mv, state=p.VolumeState.DIRTY, generation=sc.gen)
        assert err.value.error.code == p.ErrorCode.ROLE
    finally:
        plain.close()
    # The agent's refusal of FAILBACK_BEGIN reaches the operator verbatim.
    fa = sc.come_back(accept=False)
    try:
        t, _, outcome = run_failback(hub)
        t.join(30)
        assert "NOT_ALLOWED" in outcome["error"]
        assert "fail-back not accepted: stop the VM, then restart repagent.py protect with " \
               "--accept-failback" in outcome["error"]
        assert sc.vol.meta["role"] == "promoted" and fa.puts() == []
        # A second fail-back while one waits for its confirmation: BUSY.
        fa.accept = True
        gate = threading.Event()
        t, _, outcome = run_failback(hub, confirm=lambda: gate.wait(20) and False)
        wait_until(lambda: (sc.vol.failback is not None
                            and sc.vol.failback.phase == rephub.FailbackPhase.CONFIRMING),
                   20, "the first fail-back at its report")
        with pytest.raises(p.RequestError, match="already running") as err:
            hub.failback(NAME, "a1", print, lambda r: True)
        assert err.value.code == p.ErrorCode.BUSY
        # ... and no FAILOVER session may open meanwhile.
        r2 = TestAgent(hub.address, "rec", secrets["rec"]).connect()
        try:
            busy = request(r2, p.RecoverOpen(request_id=r2.request_id(),
                                             mode=p.RecoverMode.FAILOVER, name=NAME,
                                             point="latest"))
            assert isinstance(busy, p.Error) and busy.code == p.ErrorCode.BUSY
        finally:
            r2.close()
        gate.set()
        t.join(30)
        assert outcome["result"]["outcome"] == "abandoned"
    finally:
        fa.close()


def test_declined_report_changes_nothing(hubenv):
    hub, secrets = hubenv
    sc = Scene(hub, secrets)
    fa = sc.come_back()
    try:
        t, lines, outcome = run_failback(hub, confirm=False)
        t.join(30)
        res = outcome["result"]
        assert res["outcome"] == "abandoned"
        assert res["message"] == "fail-back abandoned: nothing changed"
        assert fa.puts() == [] and fa.ends() == [p.FailbackOutcome.ABORT]
        assert sc.vol.meta["role"] == "promoted" and "failbacks" not in sc.vol.meta
        assert bytes(fa.volumes[fa.vid].buf) == sc.old_site
        # Not fenced: the recovery site writes on; the late writes were saved anyway.
        assert isinstance(sc.rwrite(0, 4096, 0x5a), p.Ack)
        assert os.path.exists(os.path.join(res["late_writes_dir"], rephub.LATE_WRITES_JSON))
        assert hub.status()["volumes"][0]["failback"]["phase"] == "abandoned"
    finally:
        fa.close()
        sc.rec.close()


def test_agent_error_midway_then_rerun(hubenv):
    hub, secrets = hubenv
    sc = Scene(hub, secrets)
    fa = sc.come_back()
    try:
        fa.fail_put_at = 2
        t, _, outcome = run_failback(hub)
        t.join(30)
        assert "IO_ERROR" in outcome["error"] and "nbd write failed: EIO" in outcome["error"]
        assert fa.ends() == [p.FailbackOutcome.ABORT]
        assert sc.vol.meta["role"] == "promoted"
        st = hub.status()["volumes"][0]["failback"]
        assert st["phase"] == "failed" and "EIO" in st["error"]
        # Unfenced: the recovery site writes on, and the re-run sends that too.
        assert isinstance(sc.rwrite(2816 * KiB, 64 * KiB, 0x61), p.Ack)
        fa.fail_put_at = None
        t, _, outcome = run_failback(hub)
        t.join(30)
        assert outcome["result"]["outcome"] == "done", outcome
        assert os.path.basename(outcome["result"]["late_writes_dir"]) == "failback-2"
        assert bytes(fa.volumes[fa.vid].buf) == bytes(sc.model) == sc.hub_volume()
    finally:
        fa.close()


def test_agent_disconnects_midway(hubenv):
    hub, secrets = hubenv
    sc = Scene(hub, secrets)
    fa = sc.come_back()
    fa.hold = True
    t, _, outcome = run_failback(hub)
    wait_until(lambda: fa.puts(), 20, "the first PUT")
    fa.close()  # the original site goes away with the PUTs un-ACKed
    t.join(30)
    assert "connection is gone" in outcome["error"] and "run the fail-back again" in \
        outcome["error"]
    assert sc.vol.meta["role"] == "promoted"
    assert isinstance(sc.rwrite(0, 4096, 0x62), p.Ack)  # the fence is lifted
    fa = sc.come_back()
    try:
        t, _, outcome = run_failback(hub)
        t.join(30)
        assert outcome["result"]["outcome"] == "done", outcome
        assert bytes(fa.volumes[fa.vid].buf) == bytes(sc.model) == sc.hub_volume()
    finally:
        fa.close()


def test_no_trustworthy_bitmap_compares_checksums(hubenv):
    hub, secrets = hubenv
    sc = Scene(hub, secrets)
    sc.mv.dirty = []  # whatever it says, UNKNOWN makes the hub compare
    fa = sc.come_back(state=p.VolumeState.UNKNOWN)
    try:
        reports = []
        t, _, outcome = run_failback(hub, on_report=reports.append)
        t.join(30)
        res = outcome["result"]
    finally:
        fa.close()
    assert res["outcome"] == "done"
    late = reports[0]["late_writes"]
    assert late["known"] is False and "UNKNOWN" in late["why_unknown"]
    # Every chunk that differs: aside, recovery and late regions, chunk-aligned.
    differ = covered((o - o % CHUNK, -(-(o + n) // CHUNK) * CHUNK - (o - o % CHUNK))
                     for o, n, _ in ASIDE + RECOVERY + LATE)
    assert [tuple(e) for e in late["extents"]] == differ
    assert bytes(fa.volumes[fa.vid].buf) == bytes(sc.model) == sc.hub_volume()
    assert res["sent_bytes"] == res["delta_bytes"] == sum(n for _, n in differ)


def test_failback_cli(hubenv):
    """``rephub.py failback``: without --yes and no TTY it declines (exit 1);
    with --yes --json it prints the report and the result as JSON lines."""
    hub, secrets = hubenv
    sc = Scene(hub, secrets)
    # Released set-aside entries stay while the volume is promoted: the delta needs them.
    hub.store.roles.release_set_aside(sc.vol)
    assert hub.store.window.pin_floor() == sc.vol.meta["promotions"][-1]["point_seq"]
    fa = sc.come_back()

    def cli(*argv):
        return subprocess.run([sys.executable, rephub.__file__, "failback", "--data",
                               hub.store.dir, NAME, "--to", "a1", *argv],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=60)
    try:
        out = cli()
        assert out.returncode == 1, out
        assert "delta to send: 5 extents" in out.stdout
        assert "late writes at the original site, never received: 2 extents" in out.stdout
        assert "declining" in out.stderr and "fail-back abandoned: nothing changed" in out.stderr
        assert "preparing" in out.stderr
        out = cli("--yes", "--json")
        assert out.returncode == 0, out.stderr
        docs = [json.loads(line) for line in out.stdout.splitlines()]
        assert list(docs[0]) == ["report"] and list(docs[-1]) == ["result"]
        assert docs[-1]["result"]["outcome"] == "done"
        assert docs[0]["report"]["delta"]["bytes"] == sum(n for _, n in DELTA)
        assert bytes(fa.volumes[fa.vid].buf) == bytes(sc.model)
        out = cli("--yes")
        assert out.returncode == 1 and "not promoted: nothing to fail back" in out.stderr
        assert hub.store.window.pin_floor() is None  # protected again, entries released
    finally:
        fa.close()


class WrongAnswerAgent(FailbackAgent):
    """Answers the fail-back's DIRTY_QUERY and first READ with every other
    kind of answer naming their ids before the right answer."""

    features = p.Feature.FAILBACK | p.Feature.EXTENTS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.wrong: list[tuple[int, p.MsgType]] = []   # (request id, type sent)

    def on_DIRTY_QUERY(self, msg: p.DirtyQuery) -> None:
        self.wrong += send_wrong_answers(self, msg)
        super().on_DIRTY_QUERY(msg)

    def on_READ(self, msg: p.Read) -> None:
        if not self.reads:
            self.wrong += send_wrong_answers(self, msg)
        super().on_READ(msg)


def test_an_answer_of_another_type_is_invalid_and_the_failback_goes_on(hubenv):
    """ER-7: a READ_REPLY, CHECKSUMS or EXTENTS naming a fail-back's
    DIRTY_QUERY, or a DIRTY_MAP, CHECKSUMS or EXTENTS naming its READ,
    answers nothing: ERROR(INVALID) for each, and the right answers that
    follow bring the volume home as if nothing had happened."""
    hub, secrets = hubenv
    sc = Scene(hub, secrets)
    fa = sc.come_back(agent=WrongAnswerAgent)
    try:
        t, _, outcome = run_failback(hub)
        t.join(30)
        assert outcome["result"]["outcome"] == "done", outcome
        assert len(fa.wrong) == 6, fa.wrong
        wait_until(lambda: len(fa.errors) >= 6, 10, "an ERROR for each wrong answer")
        invalid = sorted((e.request_id, e.code, e.failed_type) for e in fa.errors)
        assert invalid == sorted((req, p.ErrorCode.INVALID, kind) for req, kind in fa.wrong)
        assert bytes(fa.volumes[fa.vid].buf) == bytes(sc.model) == sc.hub_volume()
    finally:
        fa.close()


class RefusedAnswerAgent(FailbackAgent):
    """Answers the fail-back's first READ with a READ_REPLY the codec refuses
    (an undefined must-understand flag), then behaves."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.refused: list[int] = []

    def on_READ(self, msg: p.Read) -> None:
        if self.refused:
            return super().on_READ(msg)
        self.refused.append(msg.request_id)
        frame = bytearray(p.encode(p.ReadReply(request_id=msg.request_id, volume=msg.volume,
                                               offset=msg.offset, data=bytes(msg.length))))
        frame[7] |= 0x02
        frame[44:48] = rephub.zlib.crc32(frame[:44]).to_bytes(4, "big")
        self.send_raw(bytes(frame))


def test_a_refused_answer_fails_the_failback_which_runs_again(hubenv):
    """The hub refuses a malformed READ_REPLY to a fail-back's READ: ERROR to
    the agent, and the fail-back fails at once naming it (it would otherwise
    wait for an answer that cannot come); nothing changed, and a re-run on the
    same connection brings the volume home."""
    hub, secrets = hubenv
    sc = Scene(hub, secrets)
    fa = sc.come_back(agent=RefusedAnswerAgent)
    try:
        t, _, outcome = run_failback(hub)
        t.join(30)
        assert not t.is_alive()
        assert "was refused" in outcome.get("error", ""), outcome
        # The refused READ_REPLY's ERROR, then INVALID for any answer to a READ
        # of the fail-back that came after it gave up (nothing outstanding, ER-7).
        assert fa.errors[0].request_id == fa.refused[0], fa.errors
        assert {e.code for e in fa.errors[1:]} <= {p.ErrorCode.INVALID}, fa.errors
        assert sc.vol.role is rephub.Role.PROMOTED
        assert fa.ends() == [p.FailbackOutcome.ABORT]
        t, _, outcome = run_failback(hub)
        t.join(30)
        assert outcome["result"]["outcome"] == "done", outcome
        assert bytes(fa.volumes[fa.vid].buf) == bytes(sc.model) == sc.hub_volume()
    finally:
        fa.close()

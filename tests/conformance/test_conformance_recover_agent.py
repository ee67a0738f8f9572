"""Agent direction, recovery mode (PROTOCOL.md "Recovery (remote IO)"): the
suite plays a hub for ``repagent.py recover`` and judges the recovery
connection by the same frame and error rules as a protect connection.

The suite answers RECOVER_OPEN with RECOVER_READY itself (session id 7) and
serves RREAD from a zero-filled model, so no hub and no QEMU are needed; but
only the reference agent has a recovery mode this suite can start, so an
external agent (--agent-listen) and the fakes skip these tests.
"""

from __future__ import annotations

import secrets
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cf_codec import CODE_NAMES, TYPE_VALUES, Msg, msg, raw_frame
from cf_peers import SpecHub, wait_until
from cf_targets import require_reference_agent

clause = pytest.mark.clause
ROOT = Path(__file__).resolve().parents[2]
T = 10.0
SESSION = 7
SIZE = 1 << 20
VOLUME = "cfrvol"
AGENT_ID = "cf-recover"
#: GOODBYE codes and their feature bit (PROTOCOL.md "Enumerations", [LV-5]).
SHUTDOWN, FAILED_BACK = 1, 2
GOODBYE_CODE = 1 << 2


def error_of(m) -> str:
    assert isinstance(m, Msg) and m.type == "ERROR", f"expected ERROR, got {m}"
    return CODE_NAMES.get(int(m.code), str(m.code))


class RecoverRig:
    """``repagent.py recover --test`` against a SpecHub; ``open()`` stops at
    RECOVER_OPEN so a test can send frames before RECOVER_READY."""

    def __init__(self, codec):
        self.dir = Path(tempfile.mkdtemp(prefix="cfrec", dir="/tmp"))
        self.secret = secrets.token_bytes(32)
        self.secret_file = self.dir / "secret"
        self.secret_file.write_text(self.secret.hex() + "\n")
        self.secret_file.chmod(0o600)
        self.nbd_socket = self.dir / "nbd.sock"
        self.log = self.dir / "agent.log"
        self.hub = SpecHub(("127.0.0.1", 0), AGENT_ID, self.secret, codec)
        self.proc: subprocess.Popen | None = None
        self.session = None
        self.open_msg: Msg | None = None

    def open(self, features: int = 0):
        """Start the agent; return once its RECOVER_OPEN arrived."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "repagent.py"), "recover", "--hub",
                 f"{self.hub.address[0]}:{self.hub.address[1]}", "--agent-id", AGENT_ID,
                 "--secret-file", str(self.secret_file), "--volume", VOLUME, "--at", "latest",
                 "--test", "--listen", f"unix:{self.nbd_socket}", "--log-level", "DEBUG"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=ROOT)
        s = self.session = self.hub.session(timeout=T, features=features)
        s.on_RREAD = lambda m: s.conn.send(msg(
            "RREAD_REPLY", request_id=m.request_id, volume=m.volume, offset=m.offset,
            length=m.length, data=bytes(m.length)))
        s.on_RECOVER_CLOSE = lambda m: s.conn.send(msg("ACK", request_id=m.request_id))
        self.open_msg = s.wait_for(lambda f: isinstance(f, Msg) and f.type == "RECOVER_OPEN",
                                   T, "RECOVER_OPEN")
        return s

    def ready(self) -> None:
        """Answer the RECOVER_OPEN; return once the NBD export is up."""
        self.session.conn.send(msg("RECOVER_READY", request_id=self.open_msg.request_id,
                                   volume=SESSION, size=SIZE, point_time_ns=1))
        wait_until(lambda: self.nbd_socket.exists() or self.proc.poll() is not None, T,
                   "the recovery NBD export")
        self.alive()

    def answer(self, frame, timeout: float = T) -> Msg:
        """Send ``frame`` (a Msg or raw bytes); the agent's answer to its request id."""
        s = self.session
        before = s.frames("ERROR")
        req, kind = s.conn.send_frame(frame)
        if req == 0:        # a message without request id: its ERROR names its type
            return s.wait_for(lambda f: isinstance(f, Msg) and f.type == "ERROR"
                              and f.request_id == 0 and int(f.failed_type) == kind
                              and f not in before, timeout, f"answer to type {kind:#x}")
        return s.wait_for(lambda f: isinstance(f, Msg) and f.request_id == req
                          and f.type in ("ERROR", "PONG"), timeout, f"answer to request {req}")

    def alive(self) -> None:
        """The agent runs, its connection answers PING [LV-1], and its export
        serves a read through the hub (RREAD)."""
        assert self.proc.poll() is None, f"agent exited {self.proc.returncode}: {self.tail()}"
        pong = self.session.request(msg("PING", sent_ns=4242))
        assert pong.type == "PONG" and pong.echo_ns == 4242
        import nbd      # the reference's NBD client plays the recovery VM
        with nbd.NBDClient(str(self.nbd_socket), VOLUME) as c:
            assert c.read(4096, 512) == bytes(512)

    def stop(self, timeout: float = T) -> int:
        """SIGTERM the agent; its exit code (it closes the session first)."""
        self.proc.terminate()
        return self.proc.wait(timeout)

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(T)
        if self.session is not None:
            self.session.drop()
        self.hub.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def rig(setup, codec):
    require_reference_agent(setup, "recovery mode is started by the suite")
    r = RecoverRig(codec)
    try:
        yield r
    finally:
        r.close()


def check_error(rig, frame, codes: set[str]) -> None:
    err = rig.answer(frame)
    assert error_of(err) in codes, f"{err}; expected {codes} [ER-2]"
    want_type = frame[5] if isinstance(frame, bytes) else TYPE_VALUES[frame.type]
    assert int(err.failed_type) == want_type, f"{err}: failed_type [ER-2]"


@clause("FR-16", "ER-2")
def test_unknown_type_answered_before_and_after_recover_ready(rig):
    rig.open()
    check_error(rig, raw_frame(0x7F, b"abc", request_id=901), {"UNSUPPORTED"})
    rig.ready()
    check_error(rig, raw_frame(0x7F, b"", request_id=902), {"UNSUPPORTED"})
    check_error(rig, raw_frame(0x7E, b"x" * 100, request_id=903, volume=SESSION),
                {"UNSUPPORTED"})
    rig.alive()


@clause("ER-2", "FR-7", "FR-9", "FR-13", "VO-6")
def test_request_errors_answered_and_the_session_goes_on(rig):
    rig.open()
    # Before RECOVER_READY too: a request error never ends the session.
    check_error(rig, raw_frame(TYPE_VALUES["PING"], struct.pack("!Q", 1), request_id=910,
                               length=5), {"INVALID"})
    rig.ready()
    cases = [
        # FLUSH is the agent's: the direction and the unused field may be
        # checked in either order (PROTOCOL.md does not order them).
        (raw_frame(TYPE_VALUES["FLUSH"], request_id=911, length=5), {"INVALID", "UNSUPPORTED"}),
        (raw_frame(TYPE_VALUES["PING"], struct.pack("!Q", 1), request_id=912, length=5),
         {"INVALID"}),
        (raw_frame(TYPE_VALUES["PING"], b"abc", request_id=913), {"INVALID"}),
        (raw_frame(TYPE_VALUES["PING"], struct.pack("!Q", 1), request_id=914, flags=1 << 4),
         {"UNSUPPORTED"}),
        (msg("READ", request_id=915, volume=SESSION, offset=0, length=4096),
         {"NO_SUCH_VOLUME"}),
    ]
    for frame, codes in cases:
        check_error(rig, frame, codes)
    rig.alive()


@clause("ER-5", "LV-2", "LV-4")
def test_wrong_direction_answered_and_goodbye_after_recover_close(rig):
    rig.open()
    rig.ready()
    s = rig.session
    cases = [
        msg("WRITE", request_id=920, volume=SESSION, offset=0, data=b"x"),
        msg("RREAD", request_id=921, volume=SESSION, offset=0, length=4096),
        msg("HELLO_REPLY", version=1, features=0, nonce=bytes(32),
            proof=bytes(32), hub_id="cf-hub"),
        msg("AUTH_OK"),
    ]
    for frame in cases:
        check_error(rig, frame, {"UNSUPPORTED"})
    rig.alive()
    assert rig.stop() == 0, rig.tail()
    close = s.wait_for(lambda f: isinstance(f, Msg) and f.type == "RECOVER_CLOSE", T,
                       "RECOVER_CLOSE")
    bye = s.wait_for(lambda f: isinstance(f, Msg) and f.type == "GOODBYE", T,
                     "GOODBYE after RECOVER_CLOSE's ACK")
    wait_until(s.closed.is_set, T, "the agent to close the connection")
    with s.cond:
        frames = list(s.received)
    assert frames.index(close) < frames.index(bye), "GOODBYE ends an orderly close"
    assert frames[-1] is bye, f"nothing after GOODBYE [LV-2]: {frames[frames.index(bye):]}"
    assert bye.code is None, f"{bye}: no code without GOODBYE_CODE [VN-5]"



@pytest.mark.parametrize("reason, code, rc", [
    ("bye", FAILED_BACK, 0),
    (f"volume {VOLUME} failed back to agent cf-agent", SHUTDOWN, 1)])
@clause("LV-5", "FB-12", "VN-5")
def test_goodbye_code_decides_a_fail_back_never_the_text(rig, reason, code, rc):
    """The agent offers GOODBYE_CODE; a GOODBYE(FAILED_BACK) ends its export
    as a fail-back (exit 0), and rephub's old fail-back text with another code
    ends it as a lost hub (exit 1)."""
    s = rig.open(features=GOODBYE_CODE)
    assert int(s.hello.features) & GOODBYE_CODE, f"{s.hello}: GOODBYE_CODE offered"
    rig.ready()
    s.conn.send(msg("GOODBYE", reason=reason, code=code))
    assert rig.proc.wait(T) == rc, rig.tail()
    assert not rig.nbd_socket.exists(), "the export is gone"


@clause("LV-5", "LV-4", "VN-5")
def test_goodbye_after_recover_close_carries_shutdown_where_granted(rig):
    s = rig.open(features=GOODBYE_CODE)
    rig.ready()
    assert rig.stop() == 0, rig.tail()
    bye = s.wait_for(lambda f: isinstance(f, Msg) and f.type == "GOODBYE", T, "GOODBYE")
    assert bye.code == SHUTDOWN, f"{bye}: code SHUTDOWN [LV-5]"


@clause("ER-2", "RP-9", "LV-3")
def test_malformed_rread_reply_fails_its_read_and_the_session_goes_on(rig):
    """An RREAD_REPLY whose length is not its payload's is answered
    ERROR(INVALID); the guest's read it answered fails (EIO) instead of
    waiting forever, and the next read is served."""
    import nbd
    s = rig.open()
    rig.ready()
    s.on_RREAD = lambda m: s.conn.send_raw(raw_frame(
        TYPE_VALUES["RREAD_REPLY"], bytes(m.length - 1), request_id=m.request_id,
        volume=m.volume, offset=m.offset, length=m.length))
    with nbd.NBDClient(str(rig.nbd_socket), VOLUME) as c:
        with pytest.raises(nbd.RequestError):
            c.read(0, 4096)
    bad = s.frames("RREAD")[-1]
    err = s.wait_for(lambda f: isinstance(f, Msg) and f.type == "ERROR"
                     and f.request_id == bad.request_id, T, "ERROR for the bad RREAD_REPLY")
    assert error_of(err) == "INVALID" and int(err.failed_type) == TYPE_VALUES["RREAD_REPLY"]
    s.on_RREAD = lambda m: s.conn.send(msg(
        "RREAD_REPLY", request_id=m.request_id, volume=m.volume, offset=m.offset,
        length=m.length, data=bytes(m.length)))
    rig.alive()

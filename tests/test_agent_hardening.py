"""repagent against a failing hub, damaged state files and hostile local users.

* A hub that completes the handshake and then fails (ERROR on ATTACH, or
  GOODBYE, then close) is retried with a growing backoff, and the agent's
  status and log say what the hub said (issue 14).
* A damaged bitmap body or VOLUME.json is never trusted as "nothing dirty":
  the volume attaches UNKNOWN so that the hub verifies it (issue 15).
* Every file, directory and socket the agent creates is private whatever the
  umask, and a secret file others can read is refused (issue 16).

No QEMU.  The hub is a small scripted one on 127.0.0.1 (``ScriptedHub``): it
speaks the hub's half of the handshake with protocol.py's codec and then does
what each test tells it to per connection, against the agent's heartbeat
thread run in-process.  Where the real ``repagent.py protect`` must run (under
umask 000, restarted over a damaged bitmap) it talks to ``FakeQSD``, just
enough QMP for the agent to start, and to a hub address nothing listens on.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import protocol as p
import repagent as ra
from hubtools import wait_until
from localuser import probe_as

ROOT = Path(ra.__file__).resolve().parent
CHUNK = 64 * 1024
SIZE = 16 * CHUNK
SECRET = bytes(range(32))


# ---------------------------------------------------------------------------
# A hub that fails after the handshake (issue 14 item 3)


class LoopbackServer:
    """A test server: ``serve(conn)`` for each connection ``listener`` accepts, in
    one daemon thread, until ``close``.  Subclasses set their own state before
    calling ``__init__`` (the thread starts in it)."""

    def __init__(self, listener: socket.socket, name: str):
        self.listener = listener
        self.listener.settimeout(0.1)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with conn:
                self.serve(conn)

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()


class ScriptedHub(LoopbackServer):
    """Accepts connections on 127.0.0.1; after the handshake and the agent's
    first frame (ATTACH from ``protect``, RECOVER_OPEN from ``recover``),
    ``behave(index, sock, first)`` decides what happens on the connection (its
    return closes it).  Records when each one was accepted; errors of the
    hub's side are kept in ``problems``, not raised in its thread."""

    def __init__(self, behave):
        self.behave = behave
        self.accepted: list[float] = []
        self.problems: list[str] = []
        listener = socket.create_server(("127.0.0.1", 0))
        self.address = listener.getsockname()[:2]
        super().__init__(listener, "test-hub")

    def serve(self, sock: socket.socket) -> None:
        self.accepted.append(time.monotonic())
        try:
            sock.settimeout(5)
            self._handshake(sock)
            first = p.recv_message(sock)
            if not isinstance(first, (p.Attach, p.RecoverOpen)):
                self.problems.append(f"expected ATTACH or RECOVER_OPEN, got {first!r}")
                return
            self.behave(len(self.accepted) - 1, sock, first)
        except (OSError, p.ReplicationError) as err:
            self.problems.append(f"connection {len(self.accepted)}: {err!r}")

    def _handshake(self, sock) -> None:
        hello = p.recv_message(sock)
        if not isinstance(hello, p.Hello):
            raise OSError(f"expected HELLO, got {hello!r}")
        nonce = os.urandom(p.NONCE_SIZE)
        p.send_message(sock, p.HelloReply(
            features=0, nonce=nonce, hub_id="hub",
            proof=p.hub_proof(SECRET, hello.nonce, nonce, hello.agent_id, "hub")))
        auth = p.recv_message(sock)
        if not isinstance(auth, p.Auth):
            raise OSError(f"expected AUTH, got {auth!r}")
        p.send_message(sock, p.AuthOk())


def refuse_attach(index, sock, attach):
    """What the hub of issue 14 did on a full disk, with a reason."""
    p.send_message(sock, p.Error(request_id=attach.request_id, code=p.ErrorCode.IO_ERROR,
                                 failed_type=p.MsgType.ATTACH,
                                 message="volume metadata: No space left on device"))


def say_goodbye(index, sock, attach):
    p.send_message(sock, p.Goodbye(reason="journal full, try later"))


@pytest.fixture
def heartbeat_agent(tmp_path):
    """An Agent (one volume, bitmap opened, no QEMU) whose heartbeat thread
    connects to the hub address the test passes."""
    made = []

    def make(address, max_backoff=ra.BACKOFF_MAX):
        cfg = ra.Config(hub=address, agent_id="a1", secret=SECRET, qmp="-",
                        nodes=[("disk0", "vol0")], state_dir=str(tmp_path / "state"),
                        hub_timeout=5.0, max_backoff=max_backoff)
        os.makedirs(cfg.state_dir, exist_ok=True)
        agent = ra.Agent(cfg)
        vol = agent.volumes[0]
        vol.size = SIZE
        vol.bitmap = ra.DirtyBitmap(vol.bitmap_path, SIZE, CHUNK)
        t = threading.Thread(target=agent.link.run, name="repagent-heartbeat",
                             daemon=True)
        agent.threads.append(t)
        made.append(agent)
        t.start()
        return agent

    yield make
    for agent in made:
        agent.stopping.set()
        for t in agent.threads:             # the heartbeat first: it makes connections
            t.join(10)
            assert not t.is_alive(), f"{t.name} did not stop"
        conn = agent.conn
        if conn is not None:
            conn.close("test over")
            conn.join(2)
        agent.volumes[0].bitmap.close()


@pytest.mark.parametrize("behave, words", [
    (refuse_attach, "ERROR IO_ERROR volume metadata: No space left on device"),
    (say_goodbye, "GOODBYE journal full, try later")])
def test_a_hub_failing_after_the_handshake_is_retried_with_a_growing_backoff(
        heartbeat_agent, caplog, behave, words):
    hub = ScriptedHub(behave)
    try:
        with caplog.at_level(logging.INFO, logger="repagent"):
            agent = heartbeat_agent(hub.address)
            wait_until(lambda: len(hub.accepted) >= 5, what="five connections", timeout=20)
        times = list(hub.accepted)
        gaps = [b - a for a, b in zip(times, times[1:])]
        # Before: the backoff reset at every handshake and the agent came
        # straight back (hundreds of connections a second).
        assert sum(1 for t in times if t - times[0] <= 1.0) <= 4, gaps
        assert gaps[0] >= 0.8 * ra.BACKOFF_MIN, gaps
        for before, after in zip(gaps, gaps[1:]):
            assert after > 1.15 * before, f"the backoff must grow: {gaps}"
        st = wait_until(lambda: (lambda s: s if s["last_disconnect"] else None)(agent.status()),
                        what="a disconnect in the status")
        said = words.split(" ", 1)[1]       # GOODBYE's reason, or ERROR's code and text
        assert st["last_disconnect"]["hub_said"] == words
        assert said in st["last_disconnect"]["reason"]
        assert st["last_disconnect"]["attached"] is False
        assert st["connect_attempts"] >= 5
        wait_until(lambda: "next attempt in" in ra.format_status(agent.status()),
                   what="the table during a backoff")
        text = ra.format_status(agent.status())
        assert said in text, text
        st = agent.status()
        st["connection"] = "connected"          # as between two attempts
        assert f"after connecting: {st['last_disconnect']['reason']}" in ra.format_status(st)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any(said in m and "disconnected" in m for m in warnings), warnings
        assert not hub.problems, hub.problems
    finally:
        hub.close()


def test_max_backoff_bounds_the_wait(heartbeat_agent):
    hub = ScriptedHub(refuse_attach)
    try:
        heartbeat_agent(hub.address, max_backoff=0.05)
        wait_until(lambda: len(hub.accepted) >= 8, what="eight connections", timeout=20)
        gaps = [b - a for a, b in zip(hub.accepted, hub.accepted[1:])]
        assert max(gaps[:7]) < 0.5, gaps
        assert not hub.problems, hub.problems
    finally:
        hub.close()


@pytest.mark.parametrize("value", ["0", "-1", "1e9"])
def test_max_backoff_out_of_range_is_refused(tmp_path, value):
    out = run_agent("protect", "--hub", "127.0.0.1:9", "--agent-id", "a1", "--secret-file",
                    str(write_secret(tmp_path / "secret")), "--qmp", str(tmp_path / "q.sock"),
                    "--node", "disk0=vol0", "--state-dir", str(tmp_path / "state"),
                    "--max-backoff", value)
    assert out.returncode == 2, out
    assert f"--max-backoff {float(value):g}: expected more than 0" in out.stderr, out.stderr


def test_a_connection_that_stayed_attached_resets_the_backoff(heartbeat_agent, monkeypatch):
    """Three failing connections grow the backoff; then one stays attached
    past HEALTHY_CONNECTION and the hub closes it: the agent comes back at once."""
    monkeypatch.setattr(ra, "HEALTHY_CONNECTION", 0.3)
    healthy_done = threading.Event()

    def behave(index, sock, attach):
        if index < 3:
            refuse_attach(index, sock, attach)
        elif index == 3:
            p.send_message(sock, p.Attached(request_id=attach.request_id, volume=1,
                                            plan=p.SyncPlan.NONE))
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:     # answer PINGs for 0.6 s, then close
                sock.settimeout(0.1)
                try:
                    msg = p.recv_message(sock)
                except socket.timeout:
                    msg = None
                if isinstance(msg, p.Ping):
                    p.send_message(sock, p.Pong(request_id=msg.request_id,
                                                echo_ns=msg.sent_ns, responder_ns=1))
                if time.monotonic() - hub.accepted[3] > 0.6:
                    break
            healthy_done.set()

    hub = ScriptedHub(behave)
    try:
        agent = heartbeat_agent(hub.address)
        wait_until(lambda: len(hub.accepted) >= 5, what="five connections", timeout=20)
        assert healthy_done.is_set()
        t = hub.accepted
        backoff_before = t[3] - t[2]
        after_healthy = t[4] - t[3] - 0.6
        assert backoff_before >= 0.8 * 4 * ra.BACKOFF_MIN, list(t)
        assert after_healthy < 0.5 * backoff_before, \
            f"after a healthy connection the agent reconnects at once: {list(t)}"
        assert agent.link.connect_attempts >= 5
        assert not hub.problems, hub.problems
    finally:
        hub.close()


# ---------------------------------------------------------------------------
# Damaged state files (issue 15 item 3)


def damage(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_every_bitmap_change_keeps_the_block_crcs_true(tmp_path):
    path = str(tmp_path / "v.bitmap")
    bm = ra.DirtyBitmap(path, SIZE, CHUNK)
    assert bm.created and not bm.damaged
    bm.mark(range(1, 4))
    bm.add_inflight(range(1, 2))
    bm.ack(range(1, 2))
    bm.lose(range(2, 3), 5)
    bm.synced(range(2, 3), 6)
    bm.mark(range(9, 10))
    bm.close()
    again = ra.DirtyBitmap(path, SIZE, CHUNK)
    try:
        assert not again.damaged, "a bitmap changed only through its methods is intact"
        assert list(again.set_chunks()) == [3, 9]
        again.clear_all()
    finally:
        again.close()
    third = ra.DirtyBitmap(path, SIZE, CHUNK)
    try:
        assert not third.damaged and third.dirty_count == 0
    finally:
        third.close()


def test_zeroed_bitmap_bits_are_found_with_an_intact_header(tmp_path):
    path = str(tmp_path / "v.bitmap")
    bm = ra.DirtyBitmap(path, SIZE, CHUNK)
    bm.mark(range(5, 6))
    bm.close()
    damage(path, ra.BITMAP_HEADER.size, b"\0\0")    # chunk 5's byte, as bit rot would
    again = ra.DirtyBitmap(path, SIZE, CHUNK)
    try:
        assert again.dirty_count == 0, "the damage did zero the mark"
        assert again.damaged == [0] and again.damaged_chunks() == [(0, 16)]
    finally:
        again.close()


def test_a_crash_between_a_bit_and_its_crc_looks_damaged_never_clean(tmp_path):
    path = str(tmp_path / "v.bitmap")
    bm = ra.DirtyBitmap(path, SIZE, CHUNK)
    bm.chunk_bits.bits[0] |= 0x04          # the bit is set, the agent dies before the seal
    bm.close()
    again = ra.DirtyBitmap(path, SIZE, CHUNK)
    try:
        assert again.damaged == [0]
        assert again.is_set(2), "the mark itself is kept"
    finally:
        again.close()


def test_a_damaged_bitmap_makes_the_volume_attach_unknown(tmp_path, caplog):
    state = tmp_path / "state"
    state.mkdir()
    vol = ra.Volume("vol0", "disk0", str(state))
    vol.open_bitmap(SIZE, CHUNK)
    vol.bitmap.mark(range(7, 8))
    vol.save_meta()
    assert vol.attach_state() == p.VolumeState.DIRTY
    vol.bitmap.close()
    damage(vol.bitmap_path, ra.BITMAP_HEADER.size, bytes(2))   # the pending write forgotten

    vol = ra.Volume("vol0", "disk0", str(state))
    with caplog.at_level(logging.WARNING, logger="repagent"):
        vol.open_bitmap(SIZE, CHUNK)
    try:
        assert vol.bitmap.dirty_count == 0
        assert vol.attach_state() == p.VolumeState.UNKNOWN, "never CLEAN after damage"
        lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(lines) == 1 and vol.bitmap_path in lines[0] and "damaged" in lines[0] \
            and "UNKNOWN" in lines[0], lines
    finally:
        vol.bitmap.close()
    # The verdict was saved before the CRCs were fixed: a restart still verifies.
    again = ra.Volume("vol0", "disk0", str(state))
    again.open_bitmap(SIZE, CHUNK)
    try:
        assert not again.bitmap.damaged
        assert again.attach_state() == p.VolumeState.UNKNOWN
    finally:
        again.bitmap.close()


def test_a_bitmap_whose_creation_was_cut_short_is_created_again(tmp_path):
    path = tmp_path / "v.bitmap"
    path.write_bytes(bytes(ra.BITMAP_HEADER.size + SIZE // CHUNK // 8 + ra.BITMAP_CRC.size))
    bm = ra.DirtyBitmap(str(path), SIZE, CHUNK)
    try:
        assert bm.created and not bm.damaged and bm.generation != bytes(p.GENERATION_SIZE)
    finally:
        bm.close()
    assert ra.BITMAP_HEADER.unpack(path.read_bytes()[:64])[0] == ra.BITMAP_MAGIC
    marked = bytearray(path.stat().st_size)
    marked[ra.BITMAP_HEADER.size] = 1           # a zeroed header over real marks
    path.write_bytes(bytes(marked))
    with pytest.raises(ra.BitmapError, match="bad magic"):
        ra.DirtyBitmap(str(path), SIZE, CHUNK)


def test_a_version_1_bitmap_is_upgraded_with_its_marks(tmp_path):
    path = tmp_path / "v.bitmap"
    generation = os.urandom(p.GENERATION_SIZE)
    bits = bytearray(SIZE // CHUNK // 8)
    bits[1] = 0x81                                   # chunks 8 and 15
    path.write_bytes(ra.BITMAP_HEADER.pack(ra.BITMAP_MAGIC, 1, 0, CHUNK, SIZE, generation)
                     + bytes(bits))
    bm = ra.DirtyBitmap(str(path), SIZE, CHUNK)
    try:
        assert not bm.created and not bm.damaged and bm.generation == generation
        assert list(bm.set_chunks()) == [8, 15]
    finally:
        bm.close()
    assert path.stat().st_size == ra.BITMAP_HEADER.size + len(bits) + ra.BITMAP_CRC.size
    assert ra.BITMAP_HEADER.unpack(path.read_bytes()[:64])[1] == ra.BITMAP_VERSION
    again = ra.DirtyBitmap(str(path), SIZE, CHUNK)
    try:
        assert not again.damaged and list(again.set_chunks()) == [8, 15]
    finally:
        again.close()


def test_a_terabyte_bitmap_has_few_crcs_and_each_change_reseals_one(tmp_path):
    size = 1 << 40
    bm = ra.DirtyBitmap(str(tmp_path / "big.bitmap"), size, CHUNK)
    try:
        assert bm.chunk_bits.blocks == 512     # 2 MiB of bits, 2 KiB of CRCs
        bm.mark(range(10_000_000, 10_000_001))
        crc = bm.chunk_bits.stored_crc(10_000_000 // 8 // ra.BITMAP_CRC_BLOCK)
        assert crc == bm.chunk_bits.block_crc(10_000_000 // 8 // ra.BITMAP_CRC_BLOCK)
        assert not bm.chunk_bits.stale
    finally:
        bm.close()


@pytest.mark.parametrize("content, words", [
    (b"{\"node\": \"disk0\", \"mirr", "not JSON"),          # truncated
    (bytes(200), "empty or zeroed"),
    (b"", "empty or zeroed"),
    (b"\xff\xfe garbage", "not UTF-8"),
    (b"[1, 2]", "a JSON list, expected an object"),
    (b"{\"node\": \"disk0\", \"mirror\": \"yes\"}", "'mirror' is 'yes'"),
    (b"{\"node\": \"disk0\", \"needs_verify\": 0}", "'needs_verify' is 0")])
def test_a_damaged_volume_json_is_named_set_aside_and_verified(tmp_path, caplog, content,
                                                                 words):
    state = tmp_path / "state"
    state.mkdir()
    (state / "vol0.json").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="repagent"):
        vol = ra.Volume("vol0", "disk0", str(state))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1, lines
    assert str(state / "vol0.json") in lines[0] and words in lines[0], lines
    assert (state / "vol0.json.damaged").read_bytes() == content, "the evidence is kept"
    assert vol.meta["needs_verify"] is True and vol.meta["job_id"] == "ra-disk0"
    vol.open_bitmap(SIZE, CHUNK)
    try:
        assert vol.attach_state() == p.VolumeState.UNKNOWN
    finally:
        vol.bitmap.close()
    again = ra.Volume("vol0", "disk0", str(state))      # saved at once: a restart verifies
    assert again.meta["needs_verify"] is True


def test_a_volume_json_of_a_newer_format_or_another_node_is_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "vol0.json").write_text('{"format": 9, "node": "disk0"}')
    with pytest.raises(ValueError, match=r"vol0\.json: format 9 was written by a newer"):
        ra.Volume("vol0", "disk0", str(state))
    (state / "vol0.json").write_text('{"node": "disk7"}')
    with pytest.raises(ValueError, match="belongs to node 'disk7', not 'disk0'"):
        ra.Volume("vol0", "disk0", str(state))


def run_agent(*argv, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "repagent.py"), *argv],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def write_secret(path: Path, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(SECRET.hex() + "\n")
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize("content, words", [
    (b"{\"node\": \"disk0\"", "is damaged (not JSON"),
    (b"{\"format\": 9, \"node\": \"disk0\"}", "cannot start: "),
    (b"{\"node\": \"disk9\"}", "cannot start: ")])
def test_protect_with_a_bad_volume_json_says_so_in_one_line(tmp_path, content, words):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "vol0.json").write_bytes(content)
    out = run_agent("protect", "--hub", "127.0.0.1:9", "--agent-id", "a1", "--secret-file",
                    str(write_secret(tmp_path / "secret")), "--qmp",
                    str(tmp_path / "no-qmp.sock"), "--node", "disk0=vol0", "--state-dir",
                    str(state))
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr, out.stderr
    assert words in out.stderr and str(state / "vol0.json") in out.stderr, out.stderr
    if "damaged" in words:      # then it starts, and stops at the missing QSD
        assert f"cannot connect to QMP socket {tmp_path / 'no-qmp.sock'}" in out.stderr


# ---------------------------------------------------------------------------
# Private files, sockets and secrets (issue 16, the agent's side)


class FakeQSD(LoopbackServer):
    """Just enough of QSD's QMP for ``repagent.py protect`` to start: one raw
    node over ``image``, a mirror job once the agent asks for one, no exports."""

    def __init__(self, path: Path, image: Path, size: int, job: bool = False):
        self.path, self.image, self.size = path, image, size
        self.commands: list[str] = []
        self.mirrored = job             # the agent's job runs already
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(2)
        super().__init__(listener, "test-qmp")

    def answer(self, command: str):
        if command == "query-named-block-nodes":
            return [{"node-name": "disk0", "drv": "raw",
                     "image": {"virtual-size": self.size, "filename": str(self.image)}}]
        if command == "query-block-jobs":
            return [{"device": "ra-disk0", "status": "running", "len": 0, "offset": 0}] \
                if self.mirrored else []
        if command == "blockdev-mirror":
            self.mirrored = True
        if command == "query-block-exports":
            return []
        if command == "x-debug-query-block-graph":
            return {"nodes": [], "edges": []}
        return {}

    def serve(self, conn: socket.socket) -> None:
        with conn.makefile("rwb") as f:
            try:
                f.write(json.dumps({"QMP": {"version": {"qemu": {
                    "major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}).encode()
                    + b"\n")
                f.flush()
                for line in f:
                    request = json.loads(line)
                    self.commands.append(request["execute"])
                    f.write(json.dumps({"return": self.answer(request["execute"]),
                                        "id": request.get("id")}).encode() + b"\n")
                    f.flush()
            except (OSError, ValueError):
                pass


def closed_port() -> int:
    """A loopback port nothing listens on (the agent keeps retrying it)."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


@pytest.fixture
def short_dir():
    path = Path(tempfile.mkdtemp(prefix="rah", dir="/tmp"))   # socket paths fit sun_path
    yield path
    shutil.rmtree(path, ignore_errors=True)


class ProtectProc:
    """``repagent.py protect`` of FakeQSD's disk0 as vol0, towards a hub
    address nothing listens on (it keeps retrying: no hub is needed here)."""

    def __init__(self, workdir: Path, qsd: FakeQSD, umask: int = 0o022):
        self.state = workdir / "state"
        self.log = workdir / "agent.log"
        with open(self.log, "wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "repagent.py"), "protect", "--hub",
                 f"127.0.0.1:{closed_port()}", "--agent-id", "a1", "--secret-file",
                 str(write_secret(workdir / "secret")), "--qmp", str(qsd.path), "--node",
                 "disk0=vol0", "--state-dir", str(self.state), "--log-level", "INFO"],
                cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, umask=umask)

    def status(self, timeout: float = 30.0) -> dict:
        def answer():
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}:\n"
                                     + self.log.read_text())
            try:
                return ra.query_status(str(self.state))
            except (OSError, ValueError):
                return None
        return wait_until(answer, what="the agent's control socket", timeout=timeout)

    def stop(self) -> str:
        """SIGTERM, reap; the log."""
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        return self.log.read_text()


def test_under_umask_000_everything_the_agent_creates_is_private(short_dir):
    image = short_dir / "disk.raw"
    image.write_bytes(bytes(SIZE))
    qsd = FakeQSD(short_dir / "qmp.sock", image, SIZE)
    agent = ProtectProc(short_dir, qsd, umask=0)
    state = agent.state
    try:
        agent.status()
        wait_until(lambda: "blockdev-mirror" in qsd.commands, what="the mirror set up")
        wait_until(lambda: (state / "vol0.json").exists(), what="VOLUME.json saved")
        assert agent.status()["volumes"][0]["attach_state"] == "CLEAN"
        modes = {name: os.stat(state / name).st_mode for name in
                 ("vol0.bitmap", "vol0.bitmap.fine", "vol0.json", "agent.lock",
                  "control.sock", "vol0.nbd")}
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        assert {n: stat.S_IMODE(m) for n, m in modes.items()} == dict.fromkeys(modes, 0o600)
        assert stat.S_ISSOCK(modes["control.sock"]) and stat.S_ISSOCK(modes["vol0.nbd"])
        assert not [p for p in state.iterdir() if p.name not in modes], list(state.iterdir())
    finally:
        log = agent.stop()
        qsd.close()
    assert "Traceback" not in log, log


def test_a_mirror_job_older_than_a_new_bitmap_makes_the_volume_verified(short_dir):
    """The state dir was lost while the job ran: the marks of writes not yet
    ACKed went with it, so the volume must not attach CLEAN."""
    image = short_dir / "disk.raw"
    image.write_bytes(bytes(SIZE))
    qsd = FakeQSD(short_dir / "qmp.sock", image, SIZE, job=True)
    agent = ProtectProc(short_dir, qsd)
    try:
        vol = agent.status()["volumes"][0]
        assert vol["needs_verify"] is True and vol["dirty_bytes"] == 0
        assert vol["attach_state"] == "UNKNOWN"
        assert "blockdev-mirror" not in qsd.commands, "the job is resumed, not restarted"
    finally:
        log = agent.stop()
        qsd.close()
    assert "is older than the bitmap" in log and "the hub will verify" in log, log
    assert json.loads((agent.state / "vol0.json").read_text())["needs_verify"] is True


def test_a_deleted_volume_json_beside_a_bitmap_makes_the_volume_verified(tmp_path, caplog):
    state = tmp_path / "state"
    state.mkdir()
    vol = ra.Volume("vol0", "disk0", str(state))
    vol.open_bitmap(SIZE, CHUNK)
    vol.meta["mirror"] = True
    vol.save_meta()
    vol.bitmap.close()
    os.unlink(vol.meta_path)
    vol = ra.Volume("vol0", "disk0", str(state))
    with caplog.at_level(logging.WARNING, logger="repagent"):
        vol.open_bitmap(SIZE, CHUNK)
    try:
        assert vol.attach_state() == p.VolumeState.UNKNOWN
        assert f"{vol.meta_path} is missing but its bitmap is not" in caplog.text
    finally:
        vol.bitmap.close()
    assert json.loads(open(vol.meta_path).read())["needs_verify"] is True


def test_an_existing_wide_state_dir_is_named_with_the_fix(tmp_path, caplog):
    wide = tmp_path / "state"
    wide.mkdir()
    os.chmod(wide, 0o755)
    with caplog.at_level(logging.WARNING, logger="repagent"):
        ra.private_dir(str(wide), "state dir")
    assert f"state dir {wide} is open to group or others (mode 0755): chmod 700 {wide}" \
        in caplog.text
    assert stat.S_IMODE(os.stat(wide).st_mode) == 0o755, "the operator's mode is kept"
    caplog.clear()
    os.chmod(wide, 0o700)
    with caplog.at_level(logging.WARNING, logger="repagent"):
        ra.private_dir(str(wide), "state dir")
    assert not caplog.records


def test_files_left_wide_by_an_older_agent_are_narrowed(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    vol = ra.Volume("vol0", "disk0", str(state))
    vol.open_bitmap(SIZE, CHUNK)
    vol.bitmap.close()
    vol.save_meta()
    for name in ("vol0.bitmap", "vol0.json"):
        os.chmod(state / name, 0o666)
    vol = ra.Volume("vol0", "disk0", str(state))
    vol.open_bitmap(SIZE, CHUNK)
    vol.bitmap.close()
    vol.save_meta()
    ra.open_lockfile(str(state)).close()
    for name in ("vol0.bitmap", "vol0.json", "agent.lock"):
        assert stat.S_IMODE(os.stat(state / name).st_mode) == 0o600, name


@pytest.mark.parametrize("mode, words", [
    (0o644, "is readable by others (mode 0644)"),
    (0o640, "is readable by its group (mode 0640)"),
    (0o602, "is writable by others (mode 0602)"),
    (0o641, "is readable by its group (mode 0641)")])
@pytest.mark.parametrize("command", ["protect", "recover"])
def test_a_secret_file_others_can_read_is_refused(tmp_path, mode, words, command):
    secret = write_secret(tmp_path / "secret", mode)
    common = ["--hub", "127.0.0.1:9", "--agent-id", "a1", "--secret-file", str(secret)]
    argv = {"protect": ["protect", *common, "--qmp", str(tmp_path / "q.sock"), "--node",
                        "disk0=vol0", "--state-dir", str(tmp_path / "state")],
            "recover": ["recover", *common, "--volume", "vol0", "--at", "latest", "--test",
                        "--listen", f"unix:{tmp_path}/n.sock"]}[command]
    out = run_agent(*argv)
    assert out.returncode == 2, out
    assert f"secret file {secret} {words}: chmod 600 {secret}" in out.stderr, out.stderr
    assert not (tmp_path / "state").exists(), "refused before anything was created"


def test_a_private_secret_file_is_read_and_a_bad_one_is_named(tmp_path):
    good = write_secret(tmp_path / "good")
    assert ra.read_secret_file(str(good)) == SECRET
    bad = tmp_path / "bad"
    write_secret(bad).write_text("not hex\n")
    with pytest.raises(ValueError, match=f"secret file {bad}: secret is not a hex string"):
        ra.read_secret_file(str(bad))


def test_protect_restarted_on_a_zeroed_bitmap_attaches_unknown(short_dir):
    """Issue 15 item 3 through the real command: a write QEMU made while the
    hub was away is marked; the bitmap's bits are zeroed on disk while the
    agent is stopped; the restarted agent must not attach CLEAN."""
    import nbd
    image = short_dir / "disk.raw"
    image.write_bytes(bytes(SIZE))
    qsd = FakeQSD(short_dir / "qmp.sock", image, SIZE)
    try:
        agent = ProtectProc(short_dir, qsd)
        agent.status()
        client = nbd.NBDClient(str(agent.state / "vol0.nbd"), "vol0", timeout=10)
        client.write(3 * CHUNK, b"w" * 4096)       # as the mirror would
        client.close()
        assert agent.status()["volumes"][0]["attach_state"] == "DIRTY"
        agent.stop()
        bitmap = agent.state / "vol0.bitmap"
        damage(bitmap, ra.BITMAP_HEADER.size, bytes(SIZE // CHUNK // 8))
        again = ProtectProc(short_dir, qsd)
        vol = again.status()["volumes"][0]
        assert (vol["attach_state"], vol["dirty_bytes"]) == ("UNKNOWN", 0)
        log = again.stop()
    finally:
        qsd.close()
    lines = [line for line in log.splitlines() if "WARNING" in line and str(bitmap) in line]
    assert len(lines) == 1 and "is damaged" in lines[0], log
    assert "Traceback" not in log, log


def test_recover_under_umask_000_serves_a_private_unix_socket(short_dir):
    """``repagent.py recover --listen unix:PATH``: only its owner (the recovery
    VM's user) may connect to the export, whatever the umask."""
    served = threading.Event()

    def ready(index, sock, first):
        p.send_message(sock, p.RecoverReady(request_id=first.request_id, volume=1, size=SIZE,
                                            point_time_ns=1))
        served.wait(30)             # keep the session open until the test looked

    hub = ScriptedHub(ready)
    path = short_dir / "recovery.sock"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "repagent.py"), "recover", "--hub",
         "%s:%d" % hub.address, "--agent-id", "a1", "--secret-file",
         str(write_secret(short_dir / "secret")), "--volume", "vol0", "--at", "latest",
         "--test", "--listen", f"unix:{path}"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, umask=0)
    try:
        uri = proc.stdout.readline()     # printed once it listens (bounded: the hub's
        assert uri.startswith("nbd+unix://"), proc.stderr.read()   # session ends in 30 s)
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)
        assert not hub.problems, hub.problems
    finally:
        served.set()
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)
        hub.close()



def test_another_local_user_reaches_no_agent_socket_or_state(short_dir, other_user):
    """Even with the state dir opened up (as an older agent left it), another local
    user can neither inject writes through the NBD target nor drive the control
    socket, nor read the bitmap or the secret."""
    image = short_dir / "disk.raw"
    image.write_bytes(bytes(SIZE))
    qsd = FakeQSD(short_dir / "qmp.sock", image, SIZE)
    agent = ProtectProc(short_dir, qsd, umask=0)
    state = agent.state
    try:
        agent.status()
        wait_until(lambda: (state / "vol0.json").exists(), what="VOLUME.json saved")
        for d in (short_dir, state):
            d.chmod(0o755)
        private = [state / "control.sock", state / "vol0.nbd", state / "vol0.bitmap",
                   state / "vol0.bitmap.fine", state / "vol0.json", short_dir / "secret"]
        got = probe_as(other_user, private)
        assert set(got.values()) == {"PermissionError"}, got
    finally:
        agent.stop()
        qsd.close()

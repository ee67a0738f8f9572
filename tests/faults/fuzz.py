"""A seeded mutation fuzzer for rephub, repagent's hub-facing side and its NBD server.

``make fuzz N=100000`` (``python3 tests/faults/fuzz.py --frames N``); a
bounded run is part of CI (tests/faults/test_fuzz.py).

Three targets, each a real process on loopback:

hub     ``rephub.py serve``.  Sessions as agent ``fz``: either before the
        handshake (mutated HELLO/AUTH, frames in the wrong phase) or after a
        real handshake and an ATTACH of volume ``target`` (mutated agent frames).
        A second agent, ``bystander``, stays connected the whole run with its
        own volume and writes to it between sessions.
agent   ``repagent.py protect`` of a QSD disk, connecting to ``FuzzHub``, a
        server here that plays the hub: a real handshake and ATTACHED, then
        mutated hub frames (or a mutated HELLO_REPLY before the handshake).
nbd     the same agent's NBD server (the mirror target QSD writes into):
        mutated NBD requests after a real negotiation, or mutated options.

Mutations (``mutate``): bit flips (CRCs fixed up or not), truncation, a
length/offset/volume/request field set to an extreme, a random message
type, random flags, a random payload, and valid frames in the wrong phase.

What must hold (``FuzzError`` otherwise): no process dies; none hangs (the
control sockets answer, the bystander's writes are ACKed, guest writes
through QSD complete, each within a deadline); no ``Traceback`` in any log;
the bystander's replica equals its own copy byte for byte; the agent never
sends a range outside its volume; QSD's disk is unchanged outside the one
region the liveness probe writes.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import secrets
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]

import nbd  # noqa: E402
import protocol as p  # noqa: E402
from faults.cluster import AgentProc, HubProc  # noqa: E402
from hubtools import MemVolume, TestAgent  # noqa: E402
from qemu_harness import QSD, MiB, kill_all, short_tmpdir, wait_until  # noqa: E402

VOLUME_SIZE = 1 * MiB
EXTREMES = [0, 1, 4095, 4096, VOLUME_SIZE - 1, VOLUME_SIZE, VOLUME_SIZE + 1, 2**31, 2**32 - 1,
            p.MAX_PAYLOAD, p.MAX_PAYLOAD + 1, 2**63 - 1, 2**63, 2**64 - 1]
#: Header fields a mutation may set to an extreme: (name, offset, struct format).
HEADER_FIELDS = [("request_id", 8, "!Q"), ("volume", 16, "!I"), ("payload_length", 20, "!I"),
                 ("offset", 24, "!Q"), ("length", 32, "!Q")]
#: Mutation kinds and their weights; the first three usually end a session
#: (the peer must close on a broken frame), so they are drawn less often.
MUTATIONS = {"bitflip": 1, "bitflip-crc": 1, "truncate": 1, "extreme": 2, "type": 2,
             "flags": 2, "payload": 2, "phase": 2, "valid": 3}
ENDING = {"bitflip", "bitflip-crc", "truncate"}
SESSION_TIMEOUT = 10.0
#: Frames sent to one target before the run may switch to another.
BLOCK = 500


class FuzzError(AssertionError):
    """An invariant broke: the message says which, with the seed to replay it."""


def fix_crcs(frame: bytearray) -> bytearray:
    """Recompute payload_crc over whatever follows the header, then header_crc."""
    if len(frame) >= p.HEADER_SIZE:
        struct.pack_into("!I", frame, 40, zlib.crc32(frame[p.HEADER_SIZE:]))
        struct.pack_into("!I", frame, 44, zlib.crc32(frame[:44]))
    return frame


def mutate(rng: random.Random, frame: bytes, wrong_phase: list[bytes],
           may_end: bool = True) -> tuple[str, bytes, bool]:
    """One mutation of ``frame``: (kind, bytes, whether the session must end after it).

    With ``may_end`` false only mutations after which the peer can go on
    reading (the frame stays well delimited) are drawn."""
    kinds = [k for k in MUTATIONS if may_end or k not in ENDING]
    kind = rng.choices(kinds, weights=[MUTATIONS[k] for k in kinds])[0]
    b = bytearray(frame)
    if kind in ("bitflip", "bitflip-crc"):
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b) * 8)
            b[i // 8] ^= 1 << (i % 8)
        if kind == "bitflip-crc":
            fix_crcs(b)
        return kind, bytes(b), True   # a flipped length may swallow what follows
    if kind == "truncate":
        return kind, bytes(b[:rng.randrange(0, len(b))]), True
    if kind == "extreme":
        _, off, fmt = rng.choice([f for f in HEADER_FIELDS if may_end or f[0] != "payload_length"])
        size = struct.calcsize(fmt)
        value = rng.choice(EXTREMES) % (1 << (8 * size))
        struct.pack_into(fmt, b, off, value)
        fix_crcs(b)
        return kind, bytes(b), off == 20
    if kind == "type":
        b[5] = rng.randrange(256)
        return kind, bytes(fix_crcs(b)), False
    if kind == "flags":
        struct.pack_into("!H", b, 6, rng.randrange(1 << 16))
        return kind, bytes(fix_crcs(b)), False
    if kind == "payload":
        payload = rng.randbytes(rng.choice([0, 1, 7, 16, 40, 100, 4096]))
        b = bytearray(b[:p.HEADER_SIZE]) + payload
        struct.pack_into("!I", b, 20, len(payload))
        return kind, bytes(fix_crcs(b)), False
    if kind == "phase":
        return kind, rng.choice(wrong_phase), False
    return kind, bytes(frame), False


class Drain(threading.Thread):
    """Reads a fuzzed connection until it closes, decoding what it can."""

    def __init__(self, sock: socket.socket, check=None):
        super().__init__(name="fuzz-drain", daemon=True)
        self.sock, self.check = sock, check
        self.frames: list = []
        self.problem: str | None = None

    def run(self) -> None:
        """Drain thread."""
        buf = bytearray()
        try:
            while True:
                data = self.sock.recv(1 << 20)
                if not data:
                    return
                buf += data
                while len(buf) >= p.HEADER_SIZE:
                    try:
                        header = p.parse_header(buf)
                    except p.ReplicationError as err:
                        self.problem = f"peer sent a bad frame header: {err}"
                        return
                    end = p.HEADER_SIZE + header.payload_length
                    if len(buf) < end:
                        break
                    try:
                        msg = p.decode_body(header, buf[p.HEADER_SIZE:end])
                    except p.ReplicationError as err:
                        self.problem = f"peer sent an undecodable frame: {err}"
                        return
                    del buf[:end]
                    self.frames.append(msg)
                    if self.check:
                        self.check(msg)
        except OSError:
            return


def send_all(sock: socket.socket, frames: list[bytes]) -> None:
    for f in frames:
        try:
            sock.sendall(f)
        except OSError:
            return   # the peer closed on a bad frame: expected


def end_session(sock: socket.socket, drain: Drain) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    drain.join(SESSION_TIMEOUT)
    sock.close()
    drain.join(2)
    if drain.is_alive():
        raise FuzzError(f"the peer neither answered nor closed within {SESSION_TIMEOUT} s "
                        "after the session ended")


# ---------------------------------------------------------------------------
# The hub as target


def agent_frames(rng: random.Random, vid: int) -> list[bytes]:
    """Valid agent->hub frames for volume ``vid`` (after ATTACH)."""
    req = rng.randrange(1, 1 << 20)
    off = rng.randrange(0, VOLUME_SIZE // 4096) * 4096
    n = min(rng.choice([512, 4096, 65536]), VOLUME_SIZE - off)
    msgs = [p.Write(request_id=req, volume=vid, offset=off, data=rng.randbytes(n)),
            p.Zero(request_id=req, volume=vid, offset=off, length=n),
            p.Flush(request_id=req),
            p.Checkpoint(request_id=req, name=f"cp{rng.randrange(100)}"),
            p.Ping(request_id=req, sent_ns=time.time_ns()),
            p.Pong(request_id=req, echo_ns=1, responder_ns=2),
            p.ReadReply(request_id=req, volume=vid, offset=off, data=rng.randbytes(n)),
            p.DirtyMap(request_id=req, volume=vid, extents=[(off, n)]),
            p.Ack(request_id=req),
            p.Error(request_id=req, code=p.ErrorCode.IO_ERROR, message="fuzz"),
            p.Detach(request_id=req, volume=vid),
            p.Attach(request_id=req, size=VOLUME_SIZE, chunk_size=65536,
                     state=p.VolumeState.DIRTY, generation=bytes(16), name="target"),
            p.Synced(request_id=req, volume=vid, offset=off, length=n)]
    return [p.encode(m) for m in msgs]


def hub_wrong_phase() -> list[bytes]:
    return [p.encode(m) for m in (
        p.Hello(nonce=bytes(32), agent_id="fz"), p.Auth(proof=bytes(32)), p.AuthOk(),
        p.HelloReply(nonce=bytes(32), proof=bytes(32), hub_id="x"),
        p.Attached(request_id=1, volume=1, plan=p.SyncPlan.NONE),
        p.Read(request_id=1, volume=1, offset=0, length=4096),
        p.DirtyQuery(request_id=1, volume=1),
        p.ChecksumQuery(request_id=1, volume=1, offset=0, length=65536, chunk_size=65536),
        p.Goodbye(reason="fuzz", code=p.GoodbyeCode.SHUTDOWN),
        p.Goodbye(reason="fuzz", code=200))]


class HubTarget:
    def __init__(self, workdir: Path, rng: random.Random):
        self.rng = rng
        self.workdir = workdir
        self.hub = HubProc(workdir, agent_ids=("fz", "bystander"))
        self.secret = {a: self.hub.secret(a) for a in self.hub.secret_files}
        self.bystander: TestAgent | None = None
        self.by_vol = MemVolume(VOLUME_SIZE, bytes(random.Random(7).randbytes(VOLUME_SIZE)))
        self.by_id = 0
        self.sessions = 0

    def start(self) -> "HubTarget":
        self.hub.start()
        self.address = self.hub.address
        self.bystander = TestAgent(self.address, "bystander", self.secret["bystander"]).connect()
        self.by_id, _ = self.bystander.attach("other", self.by_vol)
        wait_until(lambda: (self.hub.volume("other") or {}).get("state") == "consistent", 30,
                   "the bystander's volume synced")
        return self

    def close(self) -> None:
        if self.bystander is not None:
            self.bystander.close()
        self.hub.kill()

    def handshake(self, sock: socket.socket) -> None:
        nonce = secrets.token_bytes(p.NONCE_SIZE)
        p.send_message(sock, p.Hello(nonce=nonce, agent_id="fz"))
        reply = p.recv_message(sock)
        if not isinstance(reply, p.HelloReply):
            raise FuzzError(f"hub answered a valid HELLO with {reply!r}")
        p.send_message(sock, p.Auth(proof=p.agent_proof(self.secret["fz"], nonce, reply.nonce,
                                                        "fz", reply.hub_id)))
        ok = p.recv_message(sock)
        if not isinstance(ok, p.AuthOk):
            raise FuzzError(f"hub answered a valid AUTH with {ok!r}")

    def session(self, budget: int) -> int:
        """One connection; returns how many frames it sent."""
        rng = self.rng
        sock = socket.create_connection(self.address, timeout=SESSION_TIMEOUT)
        try:
            frames: list[bytes] = []
            if rng.random() < 0.25:     # before the handshake
                base = [p.encode(p.Hello(nonce=rng.randbytes(32), agent_id="fz")),
                        p.encode(p.Auth(proof=rng.randbytes(32)))]
                pool, count = base, rng.randint(1, 3)
            else:
                self.handshake(sock)
                req = 1
                p.send_message(sock, p.Attach(request_id=req, size=VOLUME_SIZE,
                                              chunk_size=65536, state=p.VolumeState.UNKNOWN,
                                              generation=bytes(16), name="target"))
                pool, count = None, rng.randint(5, 80)
            sock.settimeout(None)
            drain = Drain(sock)
            drain.start()
            wrong = hub_wrong_phase()
            count = min(count, budget)
            for i in range(count):
                frame = rng.choice(pool if pool else agent_frames(rng, 1))
                kind, data, last = mutate(rng, frame, wrong, may_end=i == count - 1)
                frames.append(data)
                if last:
                    break
            send_all(sock, frames)
            end_session(sock, drain)
            self.sessions += 1
            return len(frames) + (0 if pool else 1)
        finally:
            sock.close()

    def check_alive(self, what: str) -> None:
        if not self.hub.alive():
            raise FuzzError(f"rephub died ({what}):\n{self.hub.tail()}")
        self.hub.status()       # the control socket answers (raises after its timeout)
        off = self.rng.randrange(0, VOLUME_SIZE // 4096) * 4096
        self.bystander.expect_ack(self.bystander.write(self.by_id, off,
                                                       self.rng.randbytes(4096)), timeout=15)

    def final_check(self) -> None:
        self.check_alive("at the end")
        self.bystander.flush()
        wait_until(lambda: self.hub.volume("other")["lag_bytes"] == 0, 30, "hub applied")
        replica = self.hub.replica("other").read_bytes().ljust(VOLUME_SIZE, b"\0")
        if replica != bytes(self.by_vol.buf):
            raise FuzzError("the bystander's replica changed under fuzzing of another agent")
        for vol in self.hub.status()["volumes"]:
            p.validate_name(vol["name"], "volume name")
            path = self.hub.replica(vol["name"])
            if path.exists() and path.stat().st_size > vol["size"]:
                raise FuzzError(f"replica of {vol['name']} grew past its size: "
                                f"{path.stat().st_size} > {vol['size']}")
        for path in self.hub.data.rglob("*"):
            if not path.resolve().is_relative_to(self.hub.data.resolve()):
                raise FuzzError(f"{path} points outside the data dir")
        log = self.hub.log.read_text(errors="replace")
        if "Traceback" in log:
            raise FuzzError("Traceback in the hub log:\n" + log[log.index("Traceback") - 500:][:4000])


# ---------------------------------------------------------------------------
# The agent as target: FuzzHub plays the hub; NBD requests to its target


def hub_frames(rng: random.Random, vid: int) -> list[bytes]:
    req = rng.randrange(1, 1 << 20)
    off = rng.randrange(0, VOLUME_SIZE // 65536) * 65536
    msgs = [p.Read(request_id=req, volume=vid, offset=off, length=65536),
            p.DirtyQuery(request_id=req, volume=vid),
            p.ChecksumQuery(request_id=req, volume=vid, offset=off, length=65536,
                            chunk_size=65536),
            p.Synced(request_id=req, volume=vid, offset=off, length=65536),
            p.Ack(request_id=req), p.Ping(request_id=req, sent_ns=1),
            p.Pong(request_id=req, echo_ns=1, responder_ns=2),
            p.Error(request_id=req, code=p.ErrorCode.INVALID, message="fuzz"),
            p.Attached(request_id=req, volume=vid, plan=p.SyncPlan.FULL)]
    return [p.encode(m) for m in msgs]


def agent_wrong_phase() -> list[bytes]:
    return [p.encode(m) for m in (
        p.Hello(nonce=bytes(32), agent_id="fz"), p.Auth(proof=bytes(32)), p.AuthOk(),
        p.HelloReply(nonce=bytes(32), proof=bytes(32), hub_id="x"),
        p.Write(request_id=1, volume=1, offset=0, data=b"x" * 512),
        p.Attach(request_id=1, size=VOLUME_SIZE, chunk_size=65536, state=p.VolumeState.CLEAN,
                 generation=bytes(16), name="vol0"),
        p.Goodbye(reason="fuzz"),
        # Coded GOODBYEs (LV-5), granted or not: a fail-back's end in protect
        # mode, and a code no receiver knows (read as UNSPECIFIED).
        p.Goodbye(reason="fuzz", code=p.GoodbyeCode.FAILED_BACK),
        p.Goodbye(reason="fuzz", code=p.GoodbyeCode.STORAGE_RECOVERED),
        p.Goodbye(reason="fuzz", code=200))]


class AgentTarget:
    """QSD + repagent, the agent connecting to a listening socket here."""

    def __init__(self, workdir: Path, rng: random.Random):
        self.rng, self.workdir = rng, workdir
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(SESSION_TIMEOUT)
        self.secret = secrets.token_bytes(32)
        secret_file = workdir / "fz.secret"
        secret_file.write_text(self.secret.hex() + "\n")
        secret_file.chmod(0o600)
        self.qmpdir = short_tmpdir("fzq")
        qmp = self.qmpdir / "qmp.sock"
        self.qsd = QSD(workdir / "qsd", size=VOLUME_SIZE, extra_args=[
            "--chardev", f"socket,id=qmp1,path={qmp},server=on,wait=off",
            "--monitor", "chardev=qmp1"])
        # Each session is a short connection the fuzzer (or the agent) cuts:
        # by design the agent backs off on such a hub, here it must not.
        self.agent = AgentProc(workdir, self.listener.getsockname()[:2], secret_file, qmp,
                               {"disk0": "vol0"}, mode="async", agent_id="fz",
                               extra=["--max-backoff", "0.01"])
        self.sessions = 0
        self.nbd_sessions = 0
        self.bad_range: str | None = None
        self.probe = 0

    def start(self) -> "AgentTarget":
        self.qsd.start()
        self.agent.start()
        self.outside_sha = self.image_sha(65536)
        return self

    def close(self) -> None:
        self.qsd.kill()
        self.agent.close()
        self.listener.close()
        self.qsd.close()
        shutil.rmtree(self.qmpdir, ignore_errors=True)

    def image_sha(self, start: int) -> str:
        with nbd.NBDClient(str(self.qsd.export_path), "disk0") as c:
            return hashlib.sha256(c.read(start, VOLUME_SIZE - start)).hexdigest()

    def check_range(self, msg) -> None:
        """Drain thread: the agent never sends a range outside its volume."""
        if isinstance(msg, (p.Write, p.Zero, p.ReadReply)):
            if msg.offset + msg.length > VOLUME_SIZE:
                self.bad_range = f"agent sent {msg.describe()} past the volume's end"

    def accept(self) -> socket.socket:
        try:
            sock, _ = self.listener.accept()
        except TimeoutError:
            raise FuzzError(f"the agent did not reconnect within {SESSION_TIMEOUT} s:\n"
                            f"{self.agent.tail()}") from None
        sock.settimeout(SESSION_TIMEOUT)
        return sock

    def session(self, budget: int) -> int:
        rng = self.rng
        sock = self.accept()
        try:
            try:
                hello = p.recv_message(sock)
            except OSError:
                hello = None
            if hello is None:
                return 0    # a connection that gave up waiting in the accept backlog
            if not isinstance(hello, p.Hello):
                raise FuzzError(f"agent opened with {hello!r}")
            nonce = secrets.token_bytes(32)
            reply = p.HelloReply(nonce=nonce, hub_id="fuzzhub", proof=p.hub_proof(
                self.secret, hello.nonce, nonce, hello.agent_id, "fuzzhub"))
            frames: list[bytes] = []
            if rng.random() < 0.2:
                kind, data, _ = mutate(rng, p.encode(reply), agent_wrong_phase())
                frames.append(data)
                pool = None
            else:
                p.send_message(sock, reply)
                try:
                    auth = p.recv_message(sock)
                except OSError:
                    auth = None
                if auth is None:
                    return 0    # it timed out in the backlog before we answered
                if not isinstance(auth, p.Auth):
                    raise FuzzError(f"agent answered HELLO_REPLY with {auth!r}")
                p.send_message(sock, p.AuthOk())
                attach = p.recv_message(sock)
                if not isinstance(attach, p.Attach):
                    raise FuzzError(f"agent sent {attach!r} instead of ATTACH")
                p.send_message(sock, p.Attached(request_id=attach.request_id, volume=1,
                                                plan=p.SyncPlan.NONE))
                pool = True
                wrong = agent_wrong_phase()
                count = min(rng.randint(5, 80), budget)
                for i in range(count):
                    kind, data, last = mutate(rng, rng.choice(hub_frames(rng, 1)), wrong,
                                              may_end=i == count - 1)
                    frames.append(data)
                    if last:
                        break
            sock.settimeout(None)
            drain = Drain(sock, self.check_range)
            drain.start()
            send_all(sock, frames)
            end_session(sock, drain)
            if self.bad_range:
                raise FuzzError(self.bad_range)
            self.sessions += 1
            return len(frames)
        finally:
            sock.close()

    def nbd_session(self, budget: int) -> int:
        """Mutated NBD requests (or options) to the agent's NBD target."""
        rng = self.rng
        path = str(Path(self.agent.state) / "vol0.nbd")
        frames = []
        if rng.random() < 0.2:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(SESSION_TIMEOUT)
            sock.connect(path)
            sock.recv(nbd.SERVER_GREETING.size)
            opt = nbd.OPTION_HEADER.pack(rng.choice([0x49484156454F5054, rng.randrange(1 << 64)]),
                                         rng.randrange(12), rng.choice([0, 4, 2**31, 2**32 - 1]))
            frames = [nbd.CLIENT_FLAGS.pack(rng.choice([0, 1, 3, 0xFFFFFFFF])) + opt
                      + rng.randbytes(rng.randrange(16))]
        else:
            client = nbd.NBDClient(path, "vol0", timeout=SESSION_TIMEOUT)
            sock = client._sock
            for _ in range(min(rng.randint(3, 40), budget)):
                cmd = rng.choice([0, 1, 1, 3, 5, 4, rng.randrange(1 << 16)])
                off = rng.choice([0, 4096, VOLUME_SIZE - 4096, VOLUME_SIZE, 2**63, 2**64 - 1,
                                  rng.randrange(VOLUME_SIZE)])
                length = rng.choice([0, 1, 512, 4096, VOLUME_SIZE, 2**32 - 1,
                                     rng.randrange(1, 65536)])
                flags = rng.choice([0, 0, 1, 2, rng.randrange(1 << 16)])
                magic = rng.choice([nbd.REQUEST_MAGIC] * 9 + [rng.randrange(1 << 32)])
                head = nbd.REQUEST_HEADER.pack(magic, flags, cmd, rng.randrange(1 << 64),
                                               off, length)
                payload = rng.randbytes(min(length, 65536)) if cmd == 1 else b""
                frames.append(head + payload)
                if magic != nbd.REQUEST_MAGIC or cmd == 1 and length > 65536:
                    break   # the server closes (or waits for a payload never sent)
            if rng.random() < 0.5:
                frames.append(nbd.REQUEST_HEADER.pack(nbd.REQUEST_MAGIC, 0, 2, 0, 0, 0))  # DISC
        sock.settimeout(None)
        drain = Drain(sock)       # NBD replies are not decoded here: only drained
        drain.run = lambda: _drain_raw(sock)   # noqa: E731 - raw drain
        drain.start()
        send_all(sock, frames)
        end_session(sock, drain)
        self.nbd_sessions += 1
        return len(frames)

    def check_alive(self, what: str) -> None:
        if not self.agent.alive():
            raise FuzzError(f"repagent died ({what}):\n{self.agent.tail()}")
        self.agent.status()
        # A guest write through QSD completes (async mode: the agent answers
        # once marked, whatever the fuzzed hub link does).
        self.probe += 1
        start = time.monotonic()
        with nbd.NBDClient(str(self.qsd.export_path), "disk0", timeout=30) as c:
            c.write(0, bytes([self.probe % 251 + 1]) * 65536)
        if time.monotonic() - start > 10:
            raise FuzzError("a guest write took more than 10 s while fuzzing the agent")

    def final_check(self) -> None:
        self.check_alive("at the end")
        if self.image_sha(65536) != self.outside_sha:
            raise FuzzError("QSD's disk changed outside the probe region")
        log = self.agent.log.read_text(errors="replace")
        if "Traceback" in log:
            raise FuzzError("Traceback in the agent log:\n"
                            + log[log.index("Traceback") - 500:][:4000])


def _drain_raw(sock: socket.socket) -> None:
    try:
        while sock.recv(1 << 20):
            pass
    except OSError:
        pass


# ---------------------------------------------------------------------------


def run(frames: int, seed: int, time_limit: float, workdir: Path, out=sys.stdout) -> dict:
    """Fuzz the three targets with ``frames`` frames in all (hub 50 %, agent 30 %,
    NBD 20 %), stopping early at ``time_limit`` seconds.  Raises FuzzError."""
    rng = random.Random(seed)
    stats = dict(seed=seed, frames=0, hub=0, agent=0, nbd=0, hub_sessions=0,
                 agent_sessions=0, nbd_sessions=0, seconds=0.0, stopped_by="count")
    share = dict(hub=frames // 2, agent=frames * 3 // 10)
    share["nbd"] = frames - share["hub"] - share["agent"]
    start = time.monotonic()
    (workdir / "hub").mkdir(parents=True)
    (workdir / "agent").mkdir(parents=True)
    hub = HubTarget(workdir / "hub", rng)
    agent = AgentTarget(workdir / "agent", rng)
    try:
        hub.start()
        agent.start()
        n = 0
        last_report = start
        while any(stats[t] < share[t] for t in share):
            if time.monotonic() - start > time_limit:
                stats["stopped_by"] = "time"
                break
            left = [t for t in share if stats[t] < share[t]]
            # Blocks of sessions per target: the agent reconnects within its
            # handshake timeout only if its sessions follow each other.
            target = rng.choices(left, weights=[share[t] for t in left])[0]
            block_end = min(share[target], stats[target] + BLOCK)
            while stats[target] < block_end and time.monotonic() - start <= time_limit:
                budget = block_end - stats[target]
                t0 = time.monotonic()
                if target == "hub":
                    sent = hub.session(budget)
                elif target == "agent":
                    sent = agent.session(budget)
                else:
                    sent = agent.nbd_session(budget)
                stats[target] += sent
                stats["frames"] += sent
                stats[target + "_s"] = stats.get(target + "_s", 0.0) + time.monotonic() - t0
                n += 1
                if n % 25 == 0:
                    hub.check_alive(f"after {stats['hub']} hub frames, seed {seed}")
                    agent.check_alive(f"after {stats['agent']} agent frames, seed {seed}")
            if time.monotonic() - last_report > 30:
                last_report = time.monotonic()
                print(f"fuzz: {stats['frames']} frames in {last_report - start:.0f} s",
                      file=out, flush=True)
        hub.final_check()
        agent.final_check()
    finally:
        stats["hub_sessions"] = hub.sessions
        stats["agent_sessions"] = agent.sessions
        stats["nbd_sessions"] = agent.nbd_sessions
        stats["seconds"] = time.monotonic() - start
        hub.close()
        agent.close()
        kill_all()
    return stats


def table(s: dict) -> str:
    return "\n".join([
        "| seed | frames | hub frames (sessions) | agent frames (sessions) | NBD requests "
        "(sessions) | stopped by | crashes | hangs | tracebacks | time |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {s['seed']} | {s['frames']} | {s['hub']} ({s['hub_sessions']}) | {s['agent']} "
        f"({s['agent_sessions']}) | {s['nbd']} ({s['nbd_sessions']}) | {s['stopped_by']} "
        f"| 0 | 0 | 0 | {s['seconds']:.0f} s |"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=100000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--time-limit", type=float, default=4 * 3600)
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="fuzz-"))
    try:
        stats = run(args.frames, args.seed, args.time_limit, workdir)
    except FuzzError as err:
        print(f"fuzz FAILED (seed {args.seed}): {err}\nlogs kept in {workdir}")
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    print(table(stats))
    print("fuzz passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

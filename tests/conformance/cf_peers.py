"""The suite's own peers, written from PROTOCOL.md: a minimal agent and a minimal hub.

Neither imports rephub.py or repagent.py; both speak through a codec from
cf_codec (the reference one or, with ``--independent-codec``, the one written
from the spec's tables).

    Conn            one blocking connection: send Msg or raw bytes, recv with a deadline
    handshake_agent the agent's half of HELLO / HELLO_REPLY / AUTH / AUTH_OK
    SpecAgent       an established agent connection: a recv thread answers the
                    hub's READ / DIRTY_QUERY / CHECKSUM_QUERY / PING from in-memory
                    volumes (stale-read rule: reads and writes share one stream lock)
    SpecHub         a listening hub: each accepted agent becomes a HubSession
    HubSession      the hub's half of the handshake, then a recv thread that
                    records every frame, applies WRITE/ZERO/READ_REPLY to a model
                    replica in stream order, ACKs per policy and answers PING

Threads are named, stopped by closing their socket, and joined with a timeout.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import struct
import threading
import time

from cf_codec import (CloseError, EXTENT_ZERO, FLAG_ZERO, HEADER_SIZE, TYPE_VALUES, Msg,
                      WireError, decode_frame, header_payload_length, msg)

HUB_LABEL = b"RPL1 hub proof"
AGENT_LABEL = b"RPL1 agent proof"
TIMEOUT = 5.0


def transcript(label: bytes, nonce_a: bytes, nonce_h: bytes, agent_id: str, hub_id: str) -> bytes:
    """PROTOCOL.md "Authentication constants": label | nonce_a | nonce_h | agent_id | hub_id."""
    a, h = agent_id.encode(), hub_id.encode()
    return (label + bytes(nonce_a) + bytes(nonce_h) + struct.pack("!H", len(a)) + a
            + struct.pack("!H", len(h)) + h)


def proof(secret: bytes, label: bytes, nonce_a, nonce_h, agent_id: str, hub_id: str) -> bytes:
    return hmac.new(secret, transcript(label, nonce_a, nonce_h, agent_id, hub_id),
                    hashlib.sha256).digest()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.01):
    """Poll ``predicate`` until it returns a true value (returned) or ``timeout``
    seconds pass (TimeoutError naming ``what``).  The same as tests/hubtools.py's,
    kept here on purpose: the suite's peers use none of the tests' helpers."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Closed(Exception):
    """The peer closed the connection (``frames`` holds what came before)."""


class Conn:
    """One blocking connection.  ``recv`` is used by one thread at a time."""

    def __init__(self, sock: socket.socket, codec, peer: str = ""):
        self.sock = sock
        self.codec = codec
        self.peer = peer
        self.buf = bytearray()
        self.send_lock = threading.Lock()
        self.eof = False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    def connect(cls, address, codec, timeout: float = TIMEOUT) -> "Conn":
        sock = socket.create_connection(address, timeout=timeout)
        return cls(sock, codec, f"{address[0]}:{address[1]}")

    def send(self, m: Msg) -> None:
        self.send_raw(self.codec.encode(m))

    def send_raw(self, data: bytes) -> None:
        with self.send_lock:
            self.sock.sendall(data)

    def send_frame(self, frame: Msg | bytes) -> tuple[int, int]:
        """Send a message or a raw (possibly malformed) frame; return its
        header's request id and type, which an ERROR answering it names."""
        if isinstance(frame, Msg):
            self.send(frame)
            return frame.request_id, TYPE_VALUES[frame.type]
        self.send_raw(frame)
        return struct.unpack_from("!Q", frame, 8)[0], frame[5]

    def _fill(self, n: int, deadline: float) -> bool:
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete frame from {self.peer} in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(max(65536, n - len(self.buf)))
            except socket.timeout:
                raise TimeoutError(f"no complete frame from {self.peer} in time") from None
            except (ConnectionResetError, BrokenPipeError):
                chunk = b""
            if not chunk:
                self.eof = True
                return False
            self.buf += chunk
        return True

    def recv(self, timeout: float = TIMEOUT) -> Msg:
        """The next frame.  Raises Closed at EOF, TimeoutError, or WireError for a
        frame this side must reject (the frame is consumed when it is an AnswerError)."""
        deadline = time.monotonic() + timeout
        if not self._fill(HEADER_SIZE, deadline):
            if self.buf:
                raise CloseError(f"stream ended inside a header ({len(self.buf)} bytes)")
            raise Closed(f"{self.peer} closed the connection")
        header = self.codec.parse_header(bytes(self.buf[:HEADER_SIZE]))
        end = HEADER_SIZE + header_payload_length(header)
        if not self._fill(end, deadline):
            raise CloseError("stream ended inside a payload")
        frame, self.buf = bytes(self.buf[:end]), self.buf[end:]
        return self.codec.decode_body(header, frame[HEADER_SIZE:])

    def recv_until_close(self, timeout: float = TIMEOUT) -> list:
        """Read frames until EOF; return them.  TimeoutError if the peer stays open."""
        frames = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                frames.append(self.recv(max(0.01, deadline - time.monotonic())))
            except Closed:
                return frames
            except CloseError as err:
                frames.append(err)
                return frames

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def decode_one(codec, frame: bytes) -> Msg:
    return decode_frame(codec, frame)


# ---------------------------------------------------------------------------
# The agent side


class HandshakeFailed(Exception):
    def __init__(self, message: str, frames=()):
        super().__init__(message)
        self.frames = list(frames)


def handshake_agent(conn: Conn, agent_id: str, secret: bytes, *, min_version=1,
                    max_version=1, features=0, nonce: bytes | None = None,
                    check_hub_proof: bool = True) -> dict:
    """Run HELLO .. AUTH_OK; return {"reply": HELLO_REPLY, "nonce": nonce_a}."""
    nonce = nonce if nonce is not None else secrets.token_bytes(32)
    conn.send(msg("HELLO", min_version=min_version, max_version=max_version,
                  features=features, nonce=nonce, agent_id=agent_id))
    reply = conn.recv()
    if reply.type != "HELLO_REPLY":
        raise HandshakeFailed(f"expected HELLO_REPLY, got {reply.describe()}", [reply])
    expected = proof(secret, HUB_LABEL, nonce, reply.nonce, agent_id, reply.hub_id)
    if check_hub_proof and not hmac.compare_digest(expected, bytes(reply.proof)):
        raise HandshakeFailed("hub_proof does not match the secret [HS-5]", [reply])
    conn.send(msg("AUTH", proof=proof(secret, AGENT_LABEL, nonce, reply.nonce, agent_id,
                                      reply.hub_id)))
    ok = conn.recv()
    if ok.type != "AUTH_OK":
        raise HandshakeFailed(f"expected AUTH_OK, got {ok.describe()}", [reply, ok])
    return {"reply": reply, "nonce": nonce}


class MemVolume:
    """A protected volume in memory, with the regions this agent has marked dirty."""

    def __init__(self, name: str, size: int, chunk_size: int = 65536, data: bytes | None = None,
                 generation: bytes | None = None):
        self.name = name
        self.size = size
        self.chunk_size = chunk_size
        self.buf = bytearray(data if data is not None else bytes(size))
        self.generation = generation or secrets.token_bytes(16)
        self.volume_id = 0

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.buf[offset:offset + length])


class SpecAgent:
    """An established agent connection to a hub under test.

    Threads: the test's, and ``cf-agent-recv`` which records every frame in
    ``received`` and answers the hub's requests.  ``answer`` may be replaced
    per message type to answer wrongly (``self.answer_override[type] = fn``).
    """

    def __init__(self, address, agent_id: str, secret: bytes, codec, **hs):
        self.address = address
        self.agent_id = agent_id
        self.secret = secret
        self.codec = codec
        self.conn = Conn.connect(address, codec)
        self.handshake = handshake_agent(self.conn, agent_id, secret, **hs)
        self.hub_id = self.handshake["reply"].hub_id
        self.received: list = []
        self.cond = threading.Condition()
        self.stream_lock = threading.Lock()
        self.next_req = 1
        self.volumes: dict[int, MemVolume] = {}
        self.answer_override: dict = {}
        self.hold_reads = threading.Event()      # set: READs are recorded, not answered
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._recv_loop, name="cf-agent-recv", daemon=True)
        self.thread.start()

    # -- requests ---------------------------------------------------------------

    def new_req(self) -> int:
        with self.cond:
            req = self.next_req
            self.next_req += 1
            return req

    def send(self, m: Msg) -> None:
        self.conn.send(m)

    def request(self, m: Msg, timeout: float = TIMEOUT) -> Msg:
        """Send ``m`` with a fresh request id; return the answer with that id."""
        if not m.request_id:
            m.request_id = self.new_req()
        with self.stream_lock:
            self.conn.send(m)
        return self.wait_answer(m.request_id, timeout)

    ANSWERS = ("ACK", "ERROR", "ATTACHED", "RECOVER_READY", "RREAD_REPLY", "PONG")

    def wait_answer(self, req: int, timeout: float = TIMEOUT) -> Msg:
        return self.wait_for(lambda f: isinstance(f, Msg) and f.request_id == req
                             and f.type in self.ANSWERS, timeout, f"answer to req {req}")

    def wait_for(self, pred, timeout: float = TIMEOUT, what: str = "frame"):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for f in self.received:
                    if pred(f):
                        return f
                left = deadline - time.monotonic()
                if self.closed.is_set():
                    raise Closed(f"connection closed while waiting for {what}; got "
                                 f"{[getattr(f, 'type', f) for f in self.received[-8:]]}")
                if left <= 0:
                    raise TimeoutError(f"no {what} within {timeout}s; got "
                                       f"{[getattr(f, 'type', f) for f in self.received[-8:]]}")
                self.cond.wait(min(left, 0.1))

    def frames(self, type_name: str) -> list:
        with self.cond:
            return [f for f in self.received if isinstance(f, Msg) and f.type == type_name]

    def attach(self, vol: MemVolume, state: str = "CLEAN", timeout: float = TIMEOUT) -> Msg:
        req = self.new_req()
        with self.cond:
            self._attaching = (req, vol)
        answer = self.request(msg("ATTACH", request_id=req, size=vol.size,
                                  chunk_size=vol.chunk_size, state=state,
                                  generation=vol.generation, name=vol.name), timeout)
        if answer.type == "ATTACHED":
            vol.volume_id = answer.volume
        return answer

    def write(self, vol: MemVolume, offset: int, data: bytes) -> int:
        """Apply a write locally and send it (one stream step); return its request id."""
        req = self.new_req()
        with self.stream_lock:
            vol.buf[offset:offset + len(data)] = data
            self.conn.send(msg("WRITE", request_id=req, volume=vol.volume_id, offset=offset,
                               data=data))
        return req

    def zero(self, vol: MemVolume, offset: int, length: int) -> int:
        req = self.new_req()
        with self.stream_lock:
            vol.buf[offset:offset + length] = bytes(length)
            self.conn.send(msg("ZERO", request_id=req, volume=vol.volume_id, offset=offset,
                               length=length))
        return req

    def synced_cover(self, vol: MemVolume) -> bool:
        """True once SYNCED frames for ``vol`` cover the whole volume."""
        spans = sorted((f.offset, f.offset + f.length) for f in self.frames("SYNCED")
                       if f.volume == vol.volume_id)
        end = 0
        for s, e in spans:
            if s > end:
                return False
            end = max(end, e)
        return end >= vol.size

    # -- the recv loop (cf-agent-recv) -------------------------------------------

    def _recv_loop(self) -> None:
        try:
            while True:
                try:
                    m = self.conn.recv(timeout=3600)
                except WireError as err:
                    self._record(err)
                    if isinstance(err, CloseError):
                        return
                    continue
                self._record(m)
                if m.type == "ATTACHED":
                    pending = getattr(self, "_attaching", None)
                    if pending and pending[0] == m.request_id:
                        pending[1].volume_id = m.volume
                        self.volumes[m.volume] = pending[1]
                handler = self.answer_override.get(m.type) or getattr(self, f"on_{m.type}", None)
                if handler is not None:
                    handler(m)
        except (Closed, OSError, TimeoutError):
            return
        finally:
            self.closed.set()
            with self.cond:
                self.cond.notify_all()

    def _record(self, item) -> None:
        with self.cond:
            self.received.append(item)
            self.cond.notify_all()

    def _vol(self, m: Msg) -> MemVolume | None:
        vol = self.volumes.get(m.volume)
        if vol is None:
            self.conn.send(msg("ERROR", request_id=m.request_id, code=4,
                               failed_type=_type_value(m.type), message="no such volume"))
        return vol

    def on_PING(self, m: Msg) -> None:
        self.conn.send(msg("PONG", request_id=m.request_id, echo_ns=m.sent_ns,
                           responder_ns=time.time_ns()))

    def on_READ(self, m: Msg) -> None:
        if self.hold_reads.is_set():
            return
        vol = self._vol(m)
        if vol is None:
            return
        with self.stream_lock:
            data = vol.read(m.offset, m.length)
            if not any(data):
                reply = msg("READ_REPLY", request_id=m.request_id, volume=m.volume,
                            offset=m.offset, length=m.length, flags=FLAG_ZERO, data=b"")
            else:
                reply = msg("READ_REPLY", request_id=m.request_id, volume=m.volume,
                            offset=m.offset, data=data)
            self.conn.send(reply)

    def on_DIRTY_QUERY(self, m: Msg) -> None:
        if self._vol(m) is not None:
            self.conn.send(msg("DIRTY_MAP", request_id=m.request_id, volume=m.volume,
                               extents=[]))

    def checksums(self, m: Msg, vol: MemVolume) -> list:
        out = []
        for start in range(m.offset, m.offset + m.length, m.chunk_size):
            end = min(start + m.chunk_size, m.offset + m.length)
            out.append(hashlib.sha256(vol.read(start, end - start)).digest())
        return out

    def on_CHECKSUM_QUERY(self, m: Msg) -> None:
        vol = self._vol(m)
        if vol is None:
            return
        with self.stream_lock:
            self.conn.send(msg("CHECKSUMS", request_id=m.request_id, volume=m.volume,
                               offset=m.offset, length=m.length, chunk_size=m.chunk_size,
                               algorithm=m.algorithm, digests=self.checksums(m, vol)))

    def extents(self, m: Msg, vol: MemVolume, block: int = 4096) -> list:
        """Runs of zero / non-zero ``block``s of the range: (length, flags)."""
        runs: list = []
        for start in range(m.offset, m.offset + m.length, block):
            n = min(block, m.offset + m.length - start)
            flags = 0 if any(vol.read(start, n)) else EXTENT_ZERO
            if runs and runs[-1][1] == flags:
                runs[-1][0] += n
            else:
                runs.append([n, flags])
        return [tuple(r) for r in runs]

    def on_EXTENT_QUERY(self, m: Msg) -> None:
        vol = self._vol(m)
        if vol is None:
            return
        with self.stream_lock:      # the answer and the writes it reflects, in order [SY-16]
            self.conn.send(msg("EXTENTS", request_id=m.request_id, volume=m.volume,
                               offset=m.offset, length=m.length, extents=self.extents(m, vol)))

    def close(self) -> None:
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()
        self.thread.join(5)


def _type_value(name: str) -> int:
    from cf_codec import TYPE_VALUES
    return TYPE_VALUES[name]


# ---------------------------------------------------------------------------
# The hub side


class HubSession:
    """One agent connection accepted by SpecHub.

    ``handshake()`` plays the hub's half (with optional faults); then
    ``start()`` runs ``cf-hub-recv``: every frame is recorded in ``received``;
    WRITE/ZERO/READ_REPLY are applied to ``replica[volume name]`` in stream
    order; ACKs follow ``ack_policy`` ("auto" or "hold"); PING gets PONG;
    ATTACH gets ATTACHED with ``plan_for(attach_msg)``.
    """

    def __init__(self, hub: "SpecHub", conn: Conn):
        self.hub = hub
        self.conn = conn
        self.codec = conn.codec
        self.hello: Msg | None = None
        self.auth: Msg | None = None
        self.received: list = []
        self.cond = threading.Condition()
        self.closed = threading.Event()
        self.ack_policy = hub.ack_policy
        self.held_acks: list[int] = []
        self.volumes: dict[int, Msg] = {}     # volume id -> its ATTACH
        self.next_vol = 1
        self.next_req = 1 << 32
        self.thread: threading.Thread | None = None
        self.reading = threading.Event()      # clear: frames stay unread (a stalled hub)
        self.reading.set()

    def handshake(self, *, version: int = 1, features: int = 0, bad_proof: bool = False,
                  hub_id: str = "cf-hub") -> bool:
        """Hub half of the handshake; True when AUTH_OK was sent."""
        self.hello = self.conn.recv(TIMEOUT)
        if self.hello.type != "HELLO":
            return False
        nonce_h = secrets.token_bytes(32)
        hub_proof = proof(self.hub.secret, HUB_LABEL, self.hello.nonce, nonce_h,
                          self.hello.agent_id, hub_id)
        if bad_proof:
            hub_proof = bytes(b ^ 0xFF for b in hub_proof)
        self.conn.send(msg("HELLO_REPLY", version=version, features=features, nonce=nonce_h,
                           proof=hub_proof, hub_id=hub_id))
        self.nonce_h = nonce_h
        self.features = features
        nxt = self.conn.recv(TIMEOUT)
        self.auth = nxt
        if nxt.type != "AUTH":
            return False
        want = proof(self.hub.secret, AGENT_LABEL, self.hello.nonce, nonce_h,
                     self.hello.agent_id, hub_id)
        if not hmac.compare_digest(want, bytes(nxt.proof)):
            self.conn.send(msg("ERROR", code=7, failed_type=0x03, message="bad proof"))
            return False
        self.conn.send(msg("AUTH_OK"))
        return True

    def start(self) -> "HubSession":
        self.thread = threading.Thread(target=self._recv_loop, name="cf-hub-recv", daemon=True)
        self.thread.start()
        return self

    def new_req(self) -> int:
        with self.cond:
            self.next_req += 1
            return self.next_req

    def request(self, m: Msg, timeout: float = TIMEOUT) -> Msg:
        if not m.request_id:
            m.request_id = self.new_req()
        self.conn.send(m)
        return self.wait_for(lambda f: isinstance(f, Msg) and f.request_id == m.request_id
                             and f.type in ("READ_REPLY", "DIRTY_MAP", "CHECKSUMS", "EXTENTS",
                                            "ERROR", "PONG"), timeout, f"answer to {m.type}")

    def wait_for(self, pred, timeout: float = TIMEOUT, what: str = "frame"):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for f in self.received:
                    if pred(f):
                        return f
                if self.closed.is_set():
                    raise Closed(f"agent closed while waiting for {what}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {what} within {timeout}s; got "
                                       f"{[getattr(f, 'type', f) for f in self.received[-8:]]}")
                self.cond.wait(min(left, 0.1))

    def frames(self, type_name: str) -> list:
        with self.cond:
            return [f for f in self.received if isinstance(f, Msg) and f.type == type_name]

    def volume_id(self, name: str) -> int:
        for vid, att in self.volumes.items():
            if att.name == name:
                return vid
        raise KeyError(name)

    def _recv_loop(self) -> None:
        try:
            while True:
                self.reading.wait()
                try:
                    m = self.conn.recv(timeout=3600)
                except WireError as err:
                    with self.cond:
                        self.received.append(err)
                        self.cond.notify_all()
                    if isinstance(err, CloseError):
                        return
                    continue
                getattr(self, f"on_{m.type}", lambda m: None)(m)
                with self.cond:
                    self.received.append(m)
                    self.cond.notify_all()
        except (Closed, OSError, TimeoutError):
            return
        finally:
            self.closed.set()
            with self.cond:
                self.cond.notify_all()

    def _ack(self, m: Msg) -> None:
        if self.ack_policy == "auto":
            self.conn.send(msg("ACK", request_id=m.request_id))
        else:
            self.held_acks.append(m.request_id)

    def on_ATTACH(self, m: Msg) -> None:
        vid = self.next_vol
        self.next_vol += 1
        self.volumes[vid] = m
        self.hub.replica.setdefault(m.name, bytearray(m.size))
        plan = self.hub.plan_for(m)
        self.conn.send(msg("ATTACHED", request_id=m.request_id, volume=vid, plan=plan))
        if self.hub.heal and plan != "NONE":
            self._sync(vid, plan, None)

    def on_DIRTY_MAP(self, m: Msg) -> None:
        if m.request_id == 0 and self.hub.heal:     # regions the agent could not stream [SY-9]
            self._sync(m.volume, "DIRTY", [tuple(e) for e in m.extents])

    def _sync(self, vid: int, plan: str, extents) -> None:
        """Bring the model replica up to date like a hub would (on cf-hub-sync)."""
        def run():
            try:
                ext = extents
                size = self.volumes[vid].size
                if ext is None and plan == "DIRTY":
                    ext = [tuple(e) for e in self.request(msg("DIRTY_QUERY", volume=vid)).extents]
                elif ext is None:
                    ext = [(0, size)]
                for off, n in ext:
                    for piece in range(off, off + n, 1 << 20):
                        length = min(1 << 20, off + n - piece)
                        r = self.request(msg("READ", volume=vid, offset=piece, length=length))
                        if r.type == "READ_REPLY":
                            self.conn.send(msg("SYNCED", request_id=r.request_id, volume=vid,
                                               offset=piece, length=length))
            except (Closed, OSError, TimeoutError, WireError, KeyError):
                pass
        threading.Thread(target=run, name="cf-hub-sync", daemon=True).start()

    def _apply(self, m: Msg, data: bytes) -> None:
        att = self.volumes.get(m.volume)
        if att is not None:
            self.hub.replica[att.name][m.offset:m.offset + m.length] = data

    def on_WRITE(self, m: Msg) -> None:
        self._apply(m, m.data)
        self._ack(m)

    def on_ZERO(self, m: Msg) -> None:
        self._apply(m, bytes(m.length))
        self._ack(m)

    def on_READ_REPLY(self, m: Msg) -> None:
        self._apply(m, bytes(m.length) if m.flags & FLAG_ZERO else m.data)

    def on_FLUSH(self, m: Msg) -> None:
        self._ack(m)

    on_CHECKPOINT = on_DETACH = on_FLUSH

    def on_PING(self, m: Msg) -> None:
        self.conn.send(msg("PONG", request_id=m.request_id, echo_ns=m.sent_ns,
                           responder_ns=time.time_ns()))

    def release_acks(self) -> None:
        for req in self.held_acks:
            self.conn.send(msg("ACK", request_id=req))
        self.held_acks.clear()

    def drop(self) -> None:
        """Cut the connection without a word (a network failure)."""
        self.reading.set()
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()
        if self.thread is not None:
            self.thread.join(5)


class SpecHub:
    """A listening hub for an agent under test.  ``accept()`` returns the next
    HubSession (not yet handshaken)."""

    def __init__(self, listen=("127.0.0.1", 0), agent_id: str = "", secret: bytes = b"",
                 codec=None):
        self.sock = socket.create_server(listen, reuse_port=False)
        self.address = self.sock.getsockname()[:2]
        self.agent_id = agent_id
        self.secret = secret
        self.codec = codec
        self.ack_policy = "auto"
        self.heal = True          # act on plans and unsolicited DIRTY_MAPs like a hub
        self.plan = None          # None: the table of PROTOCOL.md "Sync plans"
        self.replica: dict[str, bytearray] = {}

    def plan_for(self, attach: Msg) -> str:
        if self.plan is not None:
            return self.plan
        return {0: "NONE", 1: "DIRTY"}.get(int(attach.state), "FULL")

    def accept(self, timeout: float = 30.0) -> HubSession:
        self.sock.settimeout(timeout)
        try:
            sock, peer = self.sock.accept()
        except socket.timeout:
            raise TimeoutError(f"no agent connected to {self.address} within {timeout}s") from None
        sock.settimeout(None)
        return HubSession(self, Conn(sock, self.codec, f"{peer[0]}:{peer[1]}"))

    def session(self, timeout: float = 30.0, **hs) -> HubSession:
        """Accept, handshake and start the next agent connection (retrying a
        connection whose handshake the agent abandons)."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.accept(max(0.1, deadline - time.monotonic()))
            try:
                if s.handshake(**hs):
                    return s.start()
            except (Closed, OSError, WireError, TimeoutError):
                pass
            s.conn.close()
            if time.monotonic() > deadline:
                raise TimeoutError("no agent completed the handshake")

    def close(self) -> None:
        self.sock.close()

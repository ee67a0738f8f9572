"""A minimal agent that speaks protocol v1 to a hub, for tests.

``TestAgent`` connects (TCP, optionally TLS), runs the HMAC handshake,
attaches volumes backed by ``MemVolume`` (in memory) and sends WRITE/ZERO/
CHECKPOINT/FLUSH.  Its recv thread answers the hub's READ, DIRTY_QUERY and
CHECKSUM_QUERY from the volume and obeys the stale-read rule
(docs/DESIGN.md rule 4): a local write plus the send of its WRITE, and a
local read plus the send of its READ_REPLY, each happen under one
``stream_lock``, so any write the read did not see is sent after the reply.

Also small helpers to make an agents file and wait for conditions with a
deadline.  A hub as a subprocess is ``procs.HubProc``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import ssl
import threading
import time

import protocol as p

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPHUB = os.path.join(ROOT, "rephub.py")


class CountingSocket:
    """A socket whose recv_into calls are counted (how many recvs a reader
    took); everything else goes to the socket."""

    def __init__(self, sock):
        self.sock, self.calls = sock, 0

    def recv_into(self, view):
        self.calls += 1
        return self.sock.recv_into(view)

    def __getattr__(self, name):
        return getattr(self.sock, name)


def wait_until(predicate, timeout: float = 10.0, what: str = "condition",
               interval: float = 0.01):
    """Poll ``predicate`` until it returns a true value (returned) or
    ``timeout`` seconds pass (TimeoutError naming ``what``).  The tests' one
    poll with a deadline; the conformance suite keeps its own, as it is
    written to run without this directory's helpers."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_detached(hub, name: str, timeout: float = 10.0) -> None:
    """Wait until the in-process ``hub`` has seen the last connection that
    held volume ``name`` end.  An ATTACH arriving before then meets a second
    live connection of the agent, which the hub rightly answers with plan
    VERIFY [VO-7]: a test that asserts another plan waits here first."""
    vol = hub.store.volume(name)
    wait_until(lambda: vol.attached_to is None, timeout,
               f"the hub to see the connection holding {name} end")


def make_agents_file(path: str, *agent_ids: str,
                     recover: dict[str, str] | None = None) -> dict[str, bytes]:
    """Write an agents file with fresh secrets; return {agent_id: secret}.
    ``recover`` maps an agent id to the agent whose volumes it may recover."""
    secrets_by_id = {a: secrets.token_bytes(32) for a in agent_ids}
    # Created 0600: the hub refuses an agents file group or others may read.
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w",
              encoding="utf-8") as f:
        for agent_id, secret in secrets_by_id.items():
            owner = (recover or {}).get(agent_id)
            f.write(f"{agent_id} {secret.hex()}{f' recover={owner}' if owner else ''}\n")
    os.chmod(path, 0o600)
    return secrets_by_id


class MemVolume:
    """A protected volume in memory; ``lock`` guards its bytes."""

    def __init__(self, size: int, data: bytes | None = None):
        self.buf = bytearray(size) if data is None else bytearray(data)
        self.size = size
        self.lock = threading.Lock()
        self.dirty: list[tuple[int, int]] = []

    def write(self, offset: int, data: bytes) -> None:
        with self.lock:
            self.buf[offset:offset + len(data)] = data

    def read(self, offset: int, length: int) -> bytes:
        with self.lock:
            return bytes(self.buf[offset:offset + length])


class AgentError(Exception):
    """The hub answered ERROR (``.error`` holds it) or the handshake failed."""

    def __init__(self, message: str, error: p.Error | None = None):
        super().__init__(message)
        self.error = error


class TestAgent:
    """One agent connection.  Threads: the caller's, and ``recv-<agent>``."""

    __test__ = False  # not a pytest class
    #: Feature bits offered in HELLO; ``granted`` holds the hub's answer.
    features = 0

    def __init__(self, address, agent_id: str, secret: bytes, tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None):
        self.address = address
        self.agent_id = agent_id
        self.secret = secret
        self.tls = tls
        self.server_hostname = server_hostname
        self.sock = None
        self.stream_lock = threading.Lock()    # rule 4: read+reply vs write+send
        self.send_lock = threading.Lock()
        self.req_lock = threading.Lock()
        self.next_req = 1
        self.replies: dict[int, p.Message] = {}
        self.reply_cond = threading.Condition()
        self.volumes: dict[int, MemVolume] = {}
        self.attaching: dict[int, MemVolume] = {}
        self.synced: list[p.Synced] = []
        self.reads: list[p.Read] = []
        self.errors: list[p.Error] = []
        self.goodbye: str | None = None
        self.goodbye_code = None  # GOODBYE's code (None: sent without one)
        self.closed = threading.Event()
        self.hub_id = None
        self.granted = 0         # granted in HELLO_REPLY
        self.thread = None
        self.before_read_reply = None  # test hook: called with the READ, outside locks

    # -- connection ------------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> "TestAgent":
        sock = socket.create_connection(self.address, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            # One OpenSSL call at a time: the recv thread and senders share it.
            import rephub
            sock = rephub.TLSStream(self.tls.wrap_socket(
                sock, server_hostname=self.server_hostname), timeout)
        self.sock = sock
        nonce = secrets.token_bytes(p.NONCE_SIZE)
        self.send(p.Hello(nonce=nonce, agent_id=self.agent_id, features=self.features))
        reply = p.recv_message(sock)
        if isinstance(reply, p.Error):
            raise AgentError(f"hub refused HELLO: {reply.describe()}", reply)
        if not isinstance(reply, p.HelloReply):
            raise AgentError(f"expected HELLO_REPLY, got {reply!r}")
        expected = p.hub_proof(self.secret, nonce, reply.nonce, self.agent_id, reply.hub_id)
        if not p.proof_matches(expected, reply.proof):
            self.send(p.Error(code=p.ErrorCode.AUTH_FAILED, message="hub proof wrong"))
            raise AgentError("hub proof does not match")
        self.hub_id = reply.hub_id
        self.granted = reply.features
        self.send(p.Auth(proof=p.agent_proof(self.secret, nonce, reply.nonce,
                                             self.agent_id, reply.hub_id)))
        answer = p.recv_message(sock)
        if isinstance(answer, p.Error):
            raise AgentError(f"authentication refused: {answer.describe()}", answer)
        if not isinstance(answer, p.AuthOk):
            raise AgentError(f"expected AUTH_OK, got {answer!r}")
        sock.settimeout(None)
        self.thread = threading.Thread(target=self._recv_loop, name=f"recv-{self.agent_id}",
                                       daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, msg: p.Message) -> None:
        with self.send_lock:
            p.send_message(self.sock, msg)

    def send_raw(self, data: bytes) -> None:
        with self.send_lock:
            self.sock.sendall(data)

    def request_id(self) -> int:
        with self.req_lock:
            req = self.next_req
            self.next_req += 1
            return req

    # -- requests ------------------------------------------------------------------

    def wait_reply(self, req: int, timeout: float = 20.0) -> p.Message:
        deadline = time.monotonic() + timeout
        with self.reply_cond:
            while req not in self.replies:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.closed.is_set() and req not in self.replies):
                    raise TimeoutError(f"no reply to request {req} "
                                       f"(closed={self.closed.is_set()})")
                self.reply_cond.wait(min(remaining, 0.2))
            return self.replies.pop(req)

    def expect_ack(self, req: int, timeout: float = 20.0) -> None:
        reply = self.wait_reply(req, timeout)
        if isinstance(reply, p.Error):
            raise AgentError(f"request {req} failed: {reply.describe()}", reply)
        assert isinstance(reply, p.Ack), reply

    def attach(self, name: str, volume: MemVolume, state=p.VolumeState.UNKNOWN,
               generation: bytes = bytes(16), chunk_size: int = 65536):
        """ATTACH; return (volume id, plan).  Raises AgentError on ERROR."""
        req = self.request_id()
        self.attaching[req] = volume
        self.send(p.Attach(request_id=req, size=volume.size, chunk_size=chunk_size,
                           state=state, generation=generation, name=name))
        reply = self.wait_reply(req)
        if isinstance(reply, p.Error):
            raise AgentError(f"ATTACH {name} refused: {reply.describe()}", reply)
        return reply.volume, reply.plan

    def on_ATTACHED(self, msg: p.Attached) -> None:
        # Registered here, in the recv thread, because the hub's READs follow at once.
        self.volumes[msg.volume] = self.attaching.pop(msg.request_id)
        self._reply(msg)

    def write(self, vol: int, offset: int, data: bytes) -> int:
        """Write locally and send WRITE atomically (rule 4); return the request id."""
        req = self.request_id()
        with self.stream_lock:
            if vol in self.volumes:
                self.volumes[vol].write(offset, data)
            self.send(p.Write(request_id=req, volume=vol, offset=offset, data=data))
        return req

    def zero(self, vol: int, offset: int, length: int) -> int:
        req = self.request_id()
        with self.stream_lock:
            if vol in self.volumes:
                self.volumes[vol].write(offset, bytes(length))
            self.send(p.Zero(request_id=req, volume=vol, offset=offset, length=length))
        return req

    def checkpoint(self, name: str) -> int:
        req = self.request_id()
        with self.stream_lock:
            self.send(p.Checkpoint(request_id=req, name=name))
        return req

    def flush(self) -> None:
        req = self.request_id()
        self.send(p.Flush(request_id=req))
        self.expect_ack(req)

    # -- the recv thread: answers the hub's requests ---------------------------------------

    def _recv_loop(self) -> None:
        try:
            while True:
                try:
                    msg = p.recv_message(self.sock)
                except p.RequestError as err:
                    self.errors.append(p.Error.from_exception(err))
                    continue
                if msg is None:
                    return
                handler = getattr(self, f"on_{msg.TYPE.name}", None)
                try:
                    if handler is not None:
                        handler(msg)
                    else:
                        self._reply(msg)
                except OSError:
                    # An answer (a PONG, a READ_REPLY) the hub can no longer take:
                    # what it sent before it closed, a GOODBYE say, is still to be read.
                    continue
        except (OSError, p.ProtocolError):
            return
        finally:
            self.closed.set()
            with self.reply_cond:
                self.reply_cond.notify_all()

    def _reply(self, msg: p.Message) -> None:
        with self.reply_cond:
            self.replies[msg.request_id] = msg
            self.reply_cond.notify_all()

    def on_ERROR(self, msg: p.Error) -> None:
        self.errors.append(msg)
        if not msg.request_id:
            return
        with self.reply_cond:
            # An ERROR about one of our answers carries the hub's request id,
            # which may equal the id of a request of ours whose reply is
            # waiting to be taken: it must not replace that reply.
            if msg.request_id not in self.replies:
                self._reply(msg)

    def on_GOODBYE(self, msg: p.Goodbye) -> None:
        self.goodbye = msg.reason
        self.goodbye_code = msg.code

    def on_PING(self, msg: p.Ping) -> None:
        self.send(p.Pong(request_id=msg.request_id, echo_ns=msg.sent_ns,
                         responder_ns=time.time_ns()))

    def on_SYNCED(self, msg: p.Synced) -> None:
        self.synced.append(msg)

    def on_READ(self, msg: p.Read) -> None:
        self.reads.append(msg)
        if self.before_read_reply:
            self.before_read_reply(msg)
        vol = self.volumes[msg.volume]
        with self.stream_lock:  # rule 4: read and enqueue the reply atomically
            data = vol.read(msg.offset, msg.length)
            if data.count(0) == len(data):
                reply = p.ReadReply(request_id=msg.request_id, volume=msg.volume,
                                    offset=msg.offset, length=msg.length, flags=p.FLAG_ZERO)
            else:
                reply = p.ReadReply(request_id=msg.request_id, volume=msg.volume,
                                    offset=msg.offset, data=data)
            self.send(reply)

    def on_DIRTY_QUERY(self, msg: p.DirtyQuery) -> None:
        vol = self.volumes[msg.volume]
        self.send(p.DirtyMap(request_id=msg.request_id, volume=msg.volume,
                             extents=list(vol.dirty)))

    def on_CHECKSUM_QUERY(self, msg: p.ChecksumQuery) -> None:
        vol = self.volumes[msg.volume]
        with self.stream_lock:
            data = vol.read(msg.offset, msg.length)
            digests = [hashlib.sha256(data[i:i + msg.chunk_size]).digest()
                       for i in range(0, len(data), msg.chunk_size)]
            self.send(p.Checksums(request_id=msg.request_id, volume=msg.volume,
                                  offset=msg.offset, length=msg.length,
                                  chunk_size=msg.chunk_size, digests=digests))


def send_wrong_answers(agent, request: p.Message) -> list[tuple[int, p.MsgType]]:
    """Send as ``agent`` every kind of answer to the hub's requests except
    the one ``request`` gets (protocol.ANSWERED_BY), each naming its id and
    plausible for its range: answers to nothing outstanding [ER-7].  Returns
    (request id, type sent) of each."""
    sent = []
    for answer in _wrong_answers(request):
        agent.send(answer)
        sent.append((request.request_id, answer.TYPE))
    return sent


def _wrong_answers(request: p.Message) -> list[p.Message]:
    req, vid = request.request_id, request.volume
    off, n = (request.offset, request.length) if request.length else (0, 65536)
    answers = [
        p.ReadReply(request_id=req, volume=vid, offset=off, data=b"\x5a" * n),
        p.DirtyMap(request_id=req, volume=vid, extents=[(off, n)]),
        p.Checksums(request_id=req, volume=vid, offset=off, length=n, chunk_size=65536,
                    digests=[bytes(32)] * -(-n // 65536)),
        p.Extents(request_id=req, volume=vid, offset=off, length=n,
                  extents=[(n, p.EXTENT_ZERO)])]
    return [a for a in answers if a.TYPE != p.ANSWERED_BY[request.TYPE]]


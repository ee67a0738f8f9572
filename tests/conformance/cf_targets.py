"""The implementations the suite judges, behind two small interfaces.

HubTarget (what the hub-direction tests talk to):
    .address .agent_id .secret .agent2 (id, secret) or None
    .can_crash              whether crash_restart() is available
    .crash_restart()        kill -9 (or simulate it) and start again, same address

AgentTarget (what the agent-direction tests drive; it connects to a SpecHub):
    .start(hub_address) .stop() .volume (name) .size .chunk_size
    .guest_write(offset, data) / .guest_read(offset, length)   None if unavailable

Implementations:
    ExternalHub / ExternalAgent   --hub / --agent-listen: only the wire
    RefHub                        rephub.py serve as a subprocess
    RefAgent                      qemu-storage-daemon + repagent.py protect as subprocesses
    FakeHub(durable=...)          a tiny in-process hub; durable=False ACKs on receipt
                                  and loses un-flushed data on a simulated crash
    FakeAgent(broken=...)         a tiny in-process agent; broken=True clears a dirty
                                  mark as soon as the WRITE is sent, without its ACK

The fakes exist so the suite can prove it catches the broken variants
(test_broken.py); their correct modes show the failures come from the defect.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cf_codec import FLAG_ZERO, Msg, WireError, msg
from cf_peers import (AGENT_LABEL, HUB_LABEL, Closed, Conn, handshake_agent, proof,
                      wait_until)

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0


def require_reference_agent(setup, why: str) -> None:
    """Skip the calling fixture's tests unless the reference agent is judged
    and the QEMU tools it runs on are here; ``why`` says what needs it."""
    import pytest
    if not setup.ref_agent:
        pytest.skip(f"{why}: reference agent only (not --agent-listen, not the fakes)")
    from qemu_harness import missing_tools
    if missing_tools():
        pytest.skip(f"reference agent needs QEMU tools: missing {missing_tools()}")


def parse_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def read_secret(path: str) -> bytes:
    return bytes.fromhex(Path(path).read_text().split()[0])


# ---------------------------------------------------------------------------
# Hubs


class ExternalHub:
    can_crash = False

    def __init__(self, address, agent_id, secret, agent2=None):
        self.address, self.agent_id, self.secret, self.agent2 = address, agent_id, secret, agent2

    def stop(self):
        pass


class RefHub:
    """rephub.py serve with a temp data dir and two agents: tests/procs.HubProc,
    the tests' hub launcher (imported here only, as the reference hub is the
    one target that needs it)."""

    can_crash = True

    def __init__(self):
        from procs import HubProc
        self.dir = Path(tempfile.mkdtemp(prefix="cfhub"))
        self.hub = HubProc(self.dir, agent_ids=("cf-agent", "cf-other"), data=self.dir / "data",
                           agents=self.dir / "agents", start_timeout=START_TIMEOUT)
        self.agent_id, self.secret = "cf-agent", self.hub.secret("cf-agent")
        self.agent2 = ("cf-other", self.hub.secret("cf-other"))
        self.log = self.hub.log

    @property
    def proc(self):
        return self.hub.proc

    def start(self) -> "RefHub":
        try:
            self.hub.start()
        except RuntimeError:
            self.stop()
            raise
        self.address = self.hub.address
        return self

    def tail(self, n: int = 3000) -> str:
        return self.hub.tail(n)

    def alive(self) -> bool:
        return self.hub.alive()

    def crash_restart(self) -> None:
        self._kill()
        self.start()

    def _kill(self) -> None:
        self.hub.kill()

    def stop(self) -> None:
        self._kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class FakeHub:
    """A tiny hub.  ``durable=False`` is the broken variant: it ACKs a WRITE as
    soon as it arrives and makes it durable only on FLUSH; ``crash_restart``
    forgets everything not durable (as a power loss would)."""

    can_crash = True

    def __init__(self, codec, durable: bool = True):
        self.codec = codec
        self.durable = durable
        self.agent_id, self.secret = "cf-agent", secrets.token_bytes(32)
        self.agent2 = ("cf-other", secrets.token_bytes(32))
        self.keys = dict([(self.agent_id, self.secret), self.agent2])
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()[:2]
        self.volumes: dict[str, dict] = {}      # durable: name -> meta + data
        self.pending: list = []                 # not yet durable (broken mode)
        self.lock = threading.RLock()
        self.conns: list[Conn] = []
        self.stopping = False
        self.thread = threading.Thread(target=self._accept_loop, name="cf-fakehub", daemon=True)

    def start(self) -> "FakeHub":
        self.thread.start()
        return self

    def _accept_loop(self):
        while not self.stopping:
            try:
                sock, _ = self.sock.accept()
            except OSError:
                return
            conn = Conn(sock, self.codec)
            with self.lock:
                self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name="cf-fakehub-conn",
                             daemon=True).start()

    def _serve(self, conn: Conn):
        try:
            hello = conn.recv()
            nonce = secrets.token_bytes(32)
            key = self.keys.get(hello.agent_id, secrets.token_bytes(32))
            conn.send(msg("HELLO_REPLY", version=1, nonce=nonce, hub_id="fake",
                          proof=proof(key, HUB_LABEL, hello.nonce, nonce, hello.agent_id, "fake")))
            auth = conn.recv()
            if auth.proof != proof(key, AGENT_LABEL, hello.nonce, nonce, hello.agent_id, "fake") \
                    or hello.agent_id not in self.keys:
                conn.send(msg("ERROR", code=7, failed_type=3, message="auth failed"))
                return
            conn.send(msg("AUTH_OK"))
            FakeHubSession(self, conn, hello.agent_id).run()
        except (Closed, OSError, WireError, TimeoutError):
            pass
        finally:
            conn.close()

    def flush(self):
        with self.lock:
            for name, off, data in self.pending:
                self.volumes[name]["data"][off:off + len(data)] = data
            self.pending.clear()

    def crash_restart(self):
        with self.lock:
            self.pending.clear()
            for conn in self.conns:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self.conns.clear()

    def stop(self):
        self.stopping = True
        self.crash_restart()
        self.sock.close()


class FakeHubSession:
    def __init__(self, hub: FakeHub, conn: Conn, agent_id: str):
        self.hub, self.conn, self.agent_id = hub, conn, agent_id
        self.ids: dict[int, str] = {}
        self.reads: dict[int, tuple] = {}
        self.req = 1000

    def run(self):
        while True:
            m = self.conn.recv(timeout=3600)
            getattr(self, f"on_{m.type}", self.unsupported)(m)

    def unsupported(self, m: Msg):
        if m.type not in ("ACK", "PONG", "ERROR", "GOODBYE"):
            self.conn.send(msg("ERROR", request_id=m.request_id, code=1, message="unsupported"))

    def store(self, name, off, data):
        with self.hub.lock:
            if self.hub.durable:
                self.hub.volumes[name]["data"][off:off + len(data)] = data
            else:
                self.hub.pending.append((name, off, bytes(data)))

    def on_PING(self, m):
        self.conn.send(msg("PONG", request_id=m.request_id, echo_ns=m.sent_ns,
                           responder_ns=time.time_ns()))

    def on_ATTACH(self, m):
        with self.hub.lock:
            vol = self.hub.volumes.get(m.name)
            if vol is None:
                vol = self.hub.volumes[m.name] = dict(owner=self.agent_id, size=m.size,
                                                      data=bytearray(m.size), synced=False)
                plan = "FULL"
            elif vol["owner"] != self.agent_id:
                self.conn.send(msg("ERROR", request_id=m.request_id, code=5, failed_type=0x10))
                return
            elif not vol["synced"]:
                plan = "FULL"
            else:
                plan = {0: "NONE", 1: "DIRTY", 2: "VERIFY"}[int(m.state)]
        vid = len(self.ids) + 1
        self.ids[vid] = m.name
        self.conn.send(msg("ATTACHED", request_id=m.request_id, volume=vid, plan=plan))
        if plan == "FULL":
            for off in range(0, m.size, 1 << 20):
                self._read(vid, off, min(1 << 20, m.size - off))
        elif plan == "VERIFY":
            self.req += 1
            self.reads[self.req] = ("csum", vid)
            self.conn.send(msg("CHECKSUM_QUERY", request_id=self.req, volume=vid, offset=0,
                               length=m.size, chunk_size=m.chunk_size, algorithm=1))

    def _read(self, vid, off, n):
        self.req += 1
        self.reads[self.req] = ("read", vid)
        self.conn.send(msg("READ", request_id=self.req, volume=vid, offset=off, length=n))

    def on_READ_REPLY(self, m):
        name = self.ids[m.volume]
        self.store(name, m.offset, bytes(m.length) if m.flags & FLAG_ZERO else m.data)
        self.reads.pop(m.request_id, None)
        self.hub.flush()
        self.conn.send(msg("SYNCED", request_id=m.request_id, volume=m.volume, offset=m.offset,
                           length=m.length))
        if not any(k == "read" and v == m.volume for k, v in self.reads.values()):
            self.hub.volumes[name]["synced"] = True

    def on_CHECKSUMS(self, m):
        self.reads.pop(m.request_id, None)
        data = self.hub.volumes[self.ids[m.volume]]["data"]
        for i, digest in enumerate(m.digests):
            off = m.offset + i * m.chunk_size
            n = min(m.chunk_size, m.offset + m.length - off)
            if hashlib.sha256(data[off:off + n]).digest() != digest:
                self._read(m.volume, off, n)
            else:
                self.conn.send(msg("SYNCED", request_id=m.request_id, volume=m.volume,
                                   offset=off, length=n))

    def on_WRITE(self, m):
        name = self.ids.get(m.volume)
        if name is None or m.offset + m.length > self.hub.volumes[name]["size"]:
            self.conn.send(msg("ERROR", request_id=m.request_id, code=4 if name is None else 3,
                               failed_type=0x20))
            return
        self.store(name, m.offset, m.data)
        self.conn.send(msg("ACK", request_id=m.request_id))

    def on_FLUSH(self, m):
        self.hub.flush()
        self.conn.send(msg("ACK", request_id=m.request_id))

    def on_DIRTY_MAP(self, m):
        pass

    def on_ACK(self, m):
        pass

    on_PONG = on_ERROR = on_GOODBYE = on_ACK


# ---------------------------------------------------------------------------
# Agents


class ExternalAgent:
    """An agent the tester started, pointed at --agent-listen.  With
    --agent-nbd URI the suite writes to the protected disk through that NBD export."""

    def __init__(self, agent_id, secret, nbd_uri=None, volume=None):
        self.agent_id, self.secret, self.nbd_uri = agent_id, secret, nbd_uri
        self.volume = volume
        self.size = None

    def start(self, hub_address):
        pass

    def stop(self):
        pass

    def _client(self):
        import nbd
        from urllib.parse import urlparse, parse_qs
        u = urlparse(self.nbd_uri)
        if u.scheme == "nbd+unix":
            return nbd.NBDClient(parse_qs(u.query)["socket"][0], u.path.lstrip("/"))
        return nbd.NBDClient((u.hostname, u.port or 10809), u.path.lstrip("/"))

    @property
    def can_write(self) -> bool:
        return self.nbd_uri is not None

    def guest_write(self, offset: int, data: bytes) -> None:
        with self._client() as c:
            c.write(offset, data)

    def guest_read(self, offset: int, length: int) -> bytes:
        with self._client() as c:
            return c.read(offset, length)


class RefAgent(ExternalAgent):
    """qemu-storage-daemon (tests/qemu_harness.QSD) + repagent.py protect."""

    SIZE = 4 * 1024 * 1024

    def __init__(self, agent_id="cf-agent", secret=None):
        super().__init__(agent_id, secret or secrets.token_bytes(32))
        self.dir = Path(tempfile.mkdtemp(prefix="cfag", dir="/tmp"))
        self.secret_file = self.dir / "secret"
        self.secret_file.write_text(self.secret.hex() + "\n")
        self.secret_file.chmod(0o600)   # repagent.py refuses a secret others can read
        self.state = self.dir / "state"
        self.volume = "cfvol"
        self.size = self.SIZE
        self.chunk_size = 65536
        self.log = self.dir / "agent.log"
        self.proc = None
        self.qsd = None
        self.source_uri: str | None = None    # --source URI (default: QSD's export)
        self.extra_args: list[str] = []       # more repagent.py protect options

    def start(self, hub_address):
        from qemu_harness import QSD
        if self.qsd is None:
            # A second QMP monitor for the agent: QSD serves one client per monitor.
            self.agent_qmp = self.dir / "aqmp.sock"
            self.qsd = QSD(self.dir / "qsd", size=self.size, extra_args=[
                "--chardev", f"socket,id=qmp1,path={self.agent_qmp},server=on,wait=off",
                "--monitor", "chardev=qmp1"]).start()
            self.nbd_uri = self.qsd.uri
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "repagent.py"), "protect", "--hub",
                 f"{hub_address[0]}:{hub_address[1]}", "--agent-id", self.agent_id,
                 "--secret-file", str(self.secret_file), "--qmp", str(self.agent_qmp),
                 "--node", f"{self.qsd.node}={self.volume}", "--source",
                 f"{self.qsd.node}={self.source_uri or self.qsd.uri}", "--state-dir",
                 str(self.state), "--mode", "async", "--hub-timeout", "30",
                 "--log-level", "DEBUG", *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=ROOT)
        return self

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def status(self) -> dict:
        """The agent's status document, from its control socket (not the wire:
        only for tests that need to see inside the reference agent)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.state / "control.sock"))
            s.sendall(b"status\n")
            buf = b""
            while not buf.endswith(b"\n"):
                data = s.recv(65536)
                if not data:
                    break
                buf += data
        return json.loads(buf)

    def stop_agent(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self):
        self.stop_agent()
        if self.qsd is not None:
            self.qsd.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class FakeAgent:
    """A tiny in-process agent with one in-memory volume and a dirty set of chunks.

    ``broken=True`` is the broken variant: it forgets a chunk's dirty mark as
    soon as its WRITE is sent, without waiting for the ACK."""

    can_write = True

    def __init__(self, codec, broken: bool = False, agent_id="cf-agent"):
        self.codec, self.broken, self.agent_id = codec, broken, agent_id
        self.secret = secrets.token_bytes(32)
        self.volume, self.size, self.chunk_size = "fakevol", 1 << 20, 65536
        self.data = bytearray(self.size)
        self.dirty: set[int] = set()
        self.inflight: dict[int, set] = {}
        self.generation = secrets.token_bytes(16)
        self.lock = threading.RLock()
        self.conn = None
        self.vid = 0
        self.req = 0
        self.stopping = threading.Event()

    def start(self, hub_address):
        self.hub_address = hub_address
        self.thread = threading.Thread(target=self._loop, name="cf-fakeagent", daemon=True)
        self.thread.start()
        return self

    def _loop(self):
        while not self.stopping.is_set():
            try:
                conn = Conn.connect(self.hub_address, self.codec)
                handshake_agent(conn, self.agent_id, self.secret)
                with self.lock:
                    self.conn = conn
                    self.req += 1
                    conn.send(msg("ATTACH", request_id=self.req, size=self.size,
                                  chunk_size=self.chunk_size,
                                  state="DIRTY" if self.dirty else "CLEAN",
                                  generation=self.generation, name=self.volume))
                while True:
                    m = conn.recv(timeout=3600)
                    getattr(self, f"on_{m.type}", lambda m: None)(m)
            except (Closed, OSError, WireError, TimeoutError, Exception):
                pass
            with self.lock:
                self.conn = None
                self.vid = 0
                self.inflight.clear()          # un-ACKed writes stay dirty [RP-8]
            self.stopping.wait(0.1)

    def on_ATTACHED(self, m):
        self.vid = m.volume

    def on_ACK(self, m):
        with self.lock:
            for c in self.inflight.pop(m.request_id, ()):
                if not any(c in s for s in self.inflight.values()):
                    self.dirty.discard(c)

    def on_SYNCED(self, m):
        with self.lock:
            for c in range(m.offset // self.chunk_size, -(-(m.offset + m.length) // self.chunk_size)):
                if not any(c in s for s in self.inflight.values()):
                    self.dirty.discard(c)

    def on_PING(self, m):
        self.conn.send(msg("PONG", request_id=m.request_id, echo_ns=m.sent_ns, responder_ns=1))

    def on_READ(self, m):
        with self.lock:
            self.conn.send(msg("READ_REPLY", request_id=m.request_id, volume=m.volume,
                               offset=m.offset, data=bytes(self.data[m.offset:m.offset + m.length])))

    def on_DIRTY_QUERY(self, m):
        with self.lock:
            ext = [(c * self.chunk_size, self.chunk_size) for c in sorted(self.dirty)]
            self.conn.send(msg("DIRTY_MAP", request_id=m.request_id, volume=m.volume, extents=ext))

    def on_CHECKSUM_QUERY(self, m):
        with self.lock:
            digests = [hashlib.sha256(self.data[o:min(o + m.chunk_size, m.offset + m.length)]).digest()
                       for o in range(m.offset, m.offset + m.length, m.chunk_size)]
            self.conn.send(msg("CHECKSUMS", request_id=m.request_id, volume=m.volume,
                               offset=m.offset, length=m.length, chunk_size=m.chunk_size,
                               algorithm=m.algorithm, digests=digests))

    def guest_write(self, offset: int, data: bytes) -> None:
        chunks = set(range(offset // self.chunk_size, -(-(offset + len(data)) // self.chunk_size)))
        wait_until(lambda: self.vid, 10, "the fake agent to be attached")
        with self.lock:
            self.data[offset:offset + len(data)] = data
            self.dirty |= chunks
            if self.conn is not None and self.vid:
                self.req += 1
                self.inflight[self.req] = chunks
                self.conn.send(msg("WRITE", request_id=self.req, volume=self.vid,
                                   offset=offset, data=data))
                if self.broken:
                    self.dirty -= chunks
                    del self.inflight[self.req]

    def guest_read(self, offset: int, length: int) -> bytes:
        with self.lock:
            return bytes(self.data[offset:offset + length])

    def stop(self):
        self.stopping.set()
        with self.lock:
            if self.conn is not None:
                try:
                    self.conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

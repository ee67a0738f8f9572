"""Real QEMU tools for tests: qemu-storage-daemon, qemu-io, qemu-img.

Plain helpers first (usable from any script or benchmark), pytest fixtures
at the end.  Every process started here is registered and killed by
``QSD.stop()``/``kill()`` or by the fixtures' teardown.

    QSD(workdir, size=..., fmt="raw"|"qcow2")   qemu-storage-daemon owning one image
        .start() .stop() .kill(sig) .restart()  life cycle (start waits for its sockets)
        .qmp(cmd, **args)                       one QMP command -> its "return" value
        .wait_event(name, timeout)              an asynchronous QMP event
        .start_mirror(socket, export)           active mirror (write-blocking) into an NBD server
        .image .fmt .size .export_path .export_name .node .qmp_path .uri
    qemu_io(export_path, *commands)             qemu-io against an NBD unix socket export
    image_sha256(path, fmt)                     sha256 of an image's guest-visible content
    nbd_sha256(address, export)                 sha256 read through NBD (nbd.NBDClient)
    RandomWorkload(seed, size, count)           seeded random writes, recorded, replayable
    short_tmpdir()                              a directory short enough for unix sockets
    MemoryHandler(size)                         an nbd.Handler over a bytearray
    QemuNBD(image)                              qemu-nbd serving an image on a unix socket

Unix socket paths are limited to 107 bytes, and pytest's tmp_path is often
longer, so sockets live in ``short_tmpdir()`` directories under /tmp.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import nbd  # noqa: E402
from hubtools import wait_until  # noqa: E402,F401 - the tests' one poll helper

QEMU_TOOLS = ("qemu-storage-daemon", "qemu-io", "qemu-img", "qemu-nbd", "nbdinfo")
START_TIMEOUT = 15.0          # seconds for QSD/qemu-nbd to open their sockets
STOP_TIMEOUT = 10.0           # seconds for a clean quit before SIGKILL
QMP_TIMEOUT = 30.0            # seconds for one QMP command
TOOL_TIMEOUT = 60.0           # seconds for one qemu-io/qemu-img run

MiB = 1024 * 1024


def missing_tools() -> list[str]:
    return [tool for tool in QEMU_TOOLS if shutil.which(tool) is None]


def short_tmpdir(prefix: str = "rep") -> Path:
    """A fresh directory under /tmp whose socket paths fit in sun_path."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def socket_accepts(path: str | Path) -> bool:
    """True if something listens on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def run(argv: list[str], timeout: float = TOOL_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess:
    """Run a tool to completion; on failure the error shows its output."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}\n"
                           f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def create_image(path: str | Path, size: int, fmt: str = "raw") -> Path:
    run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)])
    return Path(path)


def nbd_uri(socket_path: str | Path, export: str = "disk0") -> str:
    return f"nbd+unix:///{export}?socket={socket_path}"


def qemu_io(export_path: str | Path, *commands: str, export: str = "disk0",
            check: bool = True, timeout: float = TOOL_TIMEOUT) -> str:
    """Run qemu-io with ``-c`` commands against an NBD unix socket export.

    ``qemu_io(path, "write -P 0xab 0 64k", "read -P 0xab 0 64k")``.
    qemu-io reports a failed command on stdout and may still exit 0, so
    with ``check`` a "failed"/"error"/"Pattern verification failed" line
    raises too.  Returns stdout.
    """
    argv = ["qemu-io", "-f", "raw", nbd_uri(export_path, export)]
    for command in commands:
        argv += ["-c", command]
    proc = run(argv, timeout=timeout, check=check)
    if check:
        for line in (proc.stdout + proc.stderr).splitlines():
            low = line.lower()
            if "failed" in low or "error" in low:
                raise RuntimeError(f"qemu-io: {line}\nin: {' '.join(argv)}")
    return proc.stdout


def image_sha256(path: str | Path, fmt: str = "raw") -> str:
    """sha256 of the guest-visible content of an image.

    A raw image is hashed as is; any other format is converted to raw with
    ``qemu-img convert -U`` (shared read, so a running QSD is fine) first.
    """
    path = Path(path)
    if fmt == "raw":
        return file_sha256(path)
    with tempfile.TemporaryDirectory(prefix="sha", dir=path.parent) as tmp:
        flat = Path(tmp) / "flat.raw"
        run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(path), str(flat)])
        return file_sha256(flat)


def file_sha256(path: str | Path, chunk: int = 4 * MiB) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def nbd_sha256(address, export: str = "disk0", chunk: int = 4 * MiB) -> str:
    """sha256 of an NBD export's whole content, read with nbd.NBDClient."""
    digest = hashlib.sha256()
    with nbd.NBDClient(address, export) as client:
        for offset in range(0, client.size, chunk):
            digest.update(client.read(offset, min(chunk, client.size - offset)))
    return digest.hexdigest()


class RandomWorkload:
    """A seeded, bounded series of writes, recorded so a test can check them.

    Each write is ``(offset, length, pattern)``; ``pattern`` is a byte value
    (1..255) or ``None`` for a write-zeroes.  Offsets and lengths are
    multiples of ``align``.  The same seed gives the same writes.
    """

    def __init__(self, seed: int, size: int, count: int, max_length: int = 64 * 1024,
                 align: int = 4096, zero_fraction: float = 0.1):
        if size < align or max_length < align:
            raise ValueError(f"size {size} and max_length {max_length} must be >= align {align}")
        rng = random.Random(seed)
        self.size = size
        self.writes: list[tuple[int, int, int | None]] = []
        for _ in range(count):
            length = rng.randrange(align, max_length + 1, align)
            length = min(length, size)
            offset = rng.randrange(0, size - length + 1, align)
            pattern = None if rng.random() < zero_fraction else rng.randrange(1, 256)
            self.writes.append((offset, length, pattern))

    def qemu_io_commands(self) -> list[str]:
        return [f"write -z {off} {length}" if pattern is None
                else f"write -P {pattern:#x} {off} {length}"
                for off, length, pattern in self.writes]

    def run_qemu_io(self, export_path: str | Path, export: str = "disk0",
                    batch: int = 200) -> None:
        """Issue the writes with qemu-io, ``batch`` commands per process."""
        commands = self.qemu_io_commands()
        for start in range(0, len(commands), batch):
            qemu_io(export_path, *commands[start:start + batch], export=export)

    def run_client(self, client: "nbd.NBDClient") -> None:
        for off, length, pattern in self.writes:
            if pattern is None:
                client.write_zeroes(off, length)
            else:
                client.write(off, bytes([pattern]) * length)

    def apply(self, image: bytearray) -> bytearray:
        """Apply the writes to an in-memory copy: the expected result."""
        for off, length, pattern in self.writes:
            image[off:off + length] = bytes(length) if pattern is None \
                else bytes([pattern]) * length
        return image

    @property
    def bytes_written(self) -> int:
        return sum(length for _, length, _ in self.writes)


class QMPError(RuntimeError):
    """QEMU answered a QMP command with an error."""

    def __init__(self, command: str, error: dict):
        self.command = command
        self.error = error
        super().__init__(f"{command}: {error.get('class')}: {error.get('desc')}")


class QMPClient:
    """A minimal blocking QMP client for tests: one command at a time.

    Asynchronous events that arrive while waiting for a reply are kept in
    ``events`` (oldest first).
    """

    def __init__(self, path: str | Path, timeout: float = QMP_TIMEOUT):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._buffer = bytearray()
        self.events: list[dict] = []
        self._ids = 0
        try:                    # a caller polling for the monitor retries refusals
            self.sock.connect(str(path))
            greeting = self._read()
            if "QMP" not in greeting:
                raise RuntimeError(f"QMP greeting {greeting!r}, expected a 'QMP' object")
            self.command("qmp_capabilities")
        except BaseException:
            self.sock.close()
            raise

    def _read(self) -> dict:
        """One JSON message.  A socket timeout leaves the buffer intact, so the
        client stays usable (unlike socket.makefile after a timeout)."""
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP connection closed")
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        return json.loads(line)

    def command(self, cmd: str, **args):
        self._ids += 1
        request = {"execute": cmd, "id": self._ids}
        if args:
            request["arguments"] = args
        self.sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != self._ids:
                continue
            if "error" in msg:
                raise QMPError(cmd, msg["error"])
            return msg.get("return")

    def wait_event(self, name: str, timeout: float) -> dict:
        """Return (and remove) the first event ``name``, reading until it arrives."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event["event"] == name:
                    return self.events.pop(i)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no QMP event {name} within {timeout}s")
            self.sock.settimeout(remaining)
            try:
                msg = self._read()
            except socket.timeout:
                continue                    # the deadline check above reports it
            finally:
                self.sock.settimeout(QMP_TIMEOUT)
            if "event" in msg:
                self.events.append(msg)

    def close(self) -> None:
        self.sock.close()


class QSD:
    """qemu-storage-daemon owning one image, exported over NBD on a unix socket.

    Command line as in docs/QEMU.md "How a copy of every guest write leaves
    QEMU": a QMP monitor on ``qmp_path``, the image as node ``node`` (driver
    raw or qcow2 over a file node), an NBD server on ``export_path``
    exporting ``node`` writable as ``export_name``.  The image is created
    with qemu-img in ``workdir`` unless it exists.
    """

    def __init__(self, workdir: str | Path, size: int = 64 * MiB, fmt: str = "raw",
                 image: str | Path | None = None, node: str = "disk0",
                 export_name: str = "disk0", extra_args: list[str] | None = None):
        if fmt not in ("raw", "qcow2"):
            raise ValueError(f"image format {fmt!r}, expected 'raw' or 'qcow2'")
        self.workdir = Path(workdir)
        self.fmt = fmt
        self.size = size
        self.node = node
        self.export_name = export_name
        self.image = Path(image) if image else self.workdir / f"{node}.{fmt}"
        self.extra_args = list(extra_args or [])
        self.rundir = short_tmpdir("qsd")
        self.qmp_path = self.rundir / "qmp.sock"
        self.export_path = self.rundir / "nbd.sock"
        self.log_path = self.workdir / f"qsd-{node}.log"
        self.proc: subprocess.Popen | None = None
        self._qmp: QMPClient | None = None

    @property
    def uri(self) -> str:
        return nbd_uri(self.export_path, self.export_name)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def argv(self) -> list[str]:
        return [
            "qemu-storage-daemon",
            "--chardev", f"socket,id=qmp0,path={self.qmp_path},server=on,wait=off",
            "--monitor", "chardev=qmp0",
            "--blockdev", f"driver=file,node-name={self.node}-file,filename={self.image}",
            "--blockdev", f"driver={self.fmt},node-name={self.node},file={self.node}-file",
            "--nbd-server", f"addr.type=unix,addr.path={self.export_path}",
            "--export", f"type=nbd,id=exp0,node-name={self.node},name={self.export_name},"
                        "writable=on",
            "--pidfile", str(self.rundir / "qsd.pid"),
            *self.extra_args,
        ]

    def start(self) -> "QSD":
        """Start QSD; return once its NBD export accepts and its QMP handshake is done."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"QSD for {self.image} already running (pid {self.proc.pid})")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.image.exists():
            create_image(self.image, self.size, self.fmt)
        for path in (self.qmp_path, self.export_path):
            path.unlink(missing_ok=True)
        with open(self.log_path, "ab") as logfile:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=logfile,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        _register(self.proc)
        try:
            wait_until(self._ready, START_TIMEOUT, f"QSD sockets in {self.rundir}")
        except BaseException:
            self.kill()
            raise
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"qemu-storage-daemon exited {self.proc.returncode}: "
                               f"{self._log_tail()}")
        if not socket_accepts(self.export_path):
            return False
        # The monitor gets one connection, the one kept, not a probe that hangs
        # up and then a client: a client that followed such a probe was once
        # reset in its qmp_capabilities under load.  With one connection QSD
        # has no earlier session to tear down meanwhile.  Once qmp_capabilities
        # has returned QSD's main loop runs, so every socket in argv (those of
        # extra_args too) is listening.
        try:
            self._qmp = QMPClient(self.qmp_path)
        except (FileNotFoundError, ConnectionRefusedError):
            return False                    # not listening yet: poll again
        except OSError as e:
            try:                            # a dying QSD: let it exit, to say how
                status = self.proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                status = "none (still running)"
            raise RuntimeError(f"QMP handshake on {self.qmp_path} failed: {e!r}; "
                               f"qemu-storage-daemon exit status {status}, "
                               f"log: {self._log_tail()}") from e
        return True

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def qmp(self, cmd: str, **args):
        """Run one QMP command, return its "return" value (QMPError on error).

        Dashed argument names go through a dict:
        ``qsd.qmp("block-job-cancel", **{"device": "rep0", "force": True})``.
        """
        if self._qmp is None:
            raise RuntimeError("QSD is not running")
        return self._qmp.command(cmd, **args)

    def wait_event(self, name: str, timeout: float = 10.0) -> dict:
        if self._qmp is None:
            raise RuntimeError("QSD is not running")
        return self._qmp.wait_event(name, timeout)

    @property
    def events(self) -> list[dict]:
        return self._qmp.events if self._qmp else []

    def start_mirror(self, target_socket: str | Path, target_export: str,
                     job: str = "rep0", target_node: str = "tgt0",
                     reconnect_delay: int = 5, granularity: int = 65536,
                     sync: str = "none") -> None:
        """Add an NBD client node for the target and start an active mirror.

        The arguments are those of docs/QEMU.md "How a copy of every guest
        write leaves QEMU"; the target server must already listen.  Returns
        once the job is READY (``sync: none`` is ready at once).
        """
        self.qmp("blockdev-add", **{
            "driver": "nbd", "node-name": target_node,
            "server": {"type": "unix", "path": str(target_socket)},
            "export": target_export, "reconnect-delay": reconnect_delay})
        self.qmp("blockdev-mirror", **{
            "job-id": job, "device": self.node, "target": target_node, "sync": sync,
            "copy-mode": "write-blocking", "on-target-error": "stop",
            "on-source-error": "stop", "auto-finalize": False, "auto-dismiss": False,
            "filter-node-name": f"{job}-top", "granularity": granularity})
        wait_until(lambda: self.job_status(job) == "ready", 30.0, f"mirror {job} READY")

    def job_status(self, job: str) -> str | None:
        for info in self.qmp("query-block-jobs"):
            if info["device"] == job:
                return info.get("status")
        return None

    def stop_mirror(self, job: str = "rep0", target_node: str = "tgt0") -> None:
        """Clean tear-down (docs/QEMU.md "Stopping the mirror"): cancel,
        finalize, dismiss, delete target."""
        self.qmp("block-job-cancel", **{"device": job, "force": True})
        wait_until(lambda: self._job_state(job) in ("pending", "concluded", None),
                   30.0, f"job {job} pending")
        if self._job_state(job) == "pending":
            self.qmp("job-finalize", id=job)
        wait_until(lambda: self._job_state(job) in ("concluded", None), 30.0,
                   f"job {job} concluded")
        if self._job_state(job) == "concluded":
            self.qmp("job-dismiss", id=job)
        self.qmp("blockdev-del", **{"node-name": target_node})

    def _job_state(self, job: str) -> str | None:
        for info in self.qmp("query-jobs"):
            if info["id"] == job:
                return info["status"]
        return None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig``; for SIGKILL/SIGTERM also reap the process."""
        if self._qmp is not None and sig in (signal.SIGKILL, signal.SIGTERM):
            self._qmp.close()
            self._qmp = None
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            _reap(self.proc)

    def stop(self) -> None:
        """QMP ``quit`` and wait; SIGKILL if QSD does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            self.kill()
            return
        self.proc.send_signal(signal.SIGCONT)     # a SIGSTOPped QSD could not quit
        if self._qmp is not None:
            try:
                self._qmp.command("quit")
            except (OSError, QMPError):
                pass
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self) -> "QSD":
        """Stop (cleanly if alive) and start again on the same image."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and remove the socket directory."""
        self.stop()
        shutil.rmtree(self.rundir, ignore_errors=True)


class QemuNBD:
    """qemu-nbd serving an image on a unix socket (a reference NBD server)."""

    def __init__(self, image: str | Path, fmt: str = "raw", export_name: str = "disk0"):
        self.image = Path(image)
        self.fmt = fmt
        self.export_name = export_name
        self.rundir = short_tmpdir("qnbd")
        self.export_path = self.rundir / "nbd.sock"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "QemuNBD":
        self.proc = subprocess.Popen(
            ["qemu-nbd", "-f", self.fmt, "-x", self.export_name, "-k", str(self.export_path),
             "--persistent", "--shared=8", "--cache=writeback", str(self.image)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        _register(self.proc)
        try:
            wait_until(self._ready, START_TIMEOUT, f"qemu-nbd on {self.export_path}")
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"qemu-nbd exited {self.proc.returncode}: "
                               f"{self.proc.stderr.read().decode(errors='replace')}")
        return socket_accepts(self.export_path)

    def stop(self) -> None:
        if self.proc is not None:
            _reap(self.proc, terminate=True)
            if self.proc.stderr:
                self.proc.stderr.close()
        shutil.rmtree(self.rundir, ignore_errors=True)


# Every process started here, so a fixture can kill stragglers.
_PROCESSES: list[subprocess.Popen] = []


def _register(proc: subprocess.Popen) -> None:
    _PROCESSES.append(proc)


def _reap(proc: subprocess.Popen, terminate: bool = False) -> None:
    """End ``proc`` (SIGTERM first if ``terminate``, then SIGKILL) and wait for it."""
    if proc.poll() is None:
        if terminate:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
                return
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass


@atexit.register
def kill_all() -> None:
    """Kill every process this module started that is still running."""
    while _PROCESSES:
        proc = _PROCESSES.pop()
        if proc.poll() is None:
            try:
                # SIGCONT first: a process stopped with SIGSTOP cannot die otherwise.
                proc.send_signal(signal.SIGCONT)
            except OSError:
                pass
            _reap(proc)


# ---------------------------------------------------------------------------
# pytest fixtures.  Import them into a test module:
#     from qemu_harness import qsd, qsd_factory, requires_qemu  # noqa: F401

try:
    import pytest
except ImportError:                     # the helpers above work without pytest
    pytest = None

if pytest is not None:
    requires_qemu = pytest.mark.skipif(bool(missing_tools()),
                                       reason=f"missing QEMU tools: {missing_tools()}")

    @pytest.fixture
    def qsd_factory(tmp_path):
        """``make(size=..., fmt=...) -> started QSD``; all stopped at teardown."""
        started: list[QSD] = []

        def make(**kwargs) -> QSD:
            kwargs.setdefault("node", f"disk{len(started)}")
            kwargs.setdefault("export_name", kwargs["node"])
            instance = QSD(tmp_path / kwargs["node"], **kwargs)
            started.append(instance)
            return instance.start()

        try:
            yield make
        finally:
            for instance in started:
                try:
                    instance.close()
                finally:
                    instance.kill()
            kill_all()

    @pytest.fixture
    def qsd(qsd_factory):
        """A running QSD with a 64 MiB raw image exported as ``disk0``."""
        return qsd_factory(size=64 * MiB, fmt="raw")

    @pytest.fixture
    def sockdir():
        """A short directory for unix sockets, removed at teardown."""
        path = short_tmpdir("sock")
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


class MemoryHandler(nbd.Handler):
    """An nbd.Handler keeping the export in memory; replies at once.

    Runs in the connection's recv thread.  Counts what it was asked to do
    (``ops`` maps command name to count) so tests can see what arrived.
    """

    def __init__(self, size: int):
        self.image = bytearray(size)
        self.lock = threading.Lock()
        self.ops: dict[str, int] = {"write": 0, "write_zeroes": 0, "flush": 0, "read": 0}

    def write(self, offset, data, reply):
        with self.lock:
            self.image[offset:offset + len(data)] = data
            self.ops["write"] += 1
        reply(0)

    def write_zeroes(self, offset, length, reply):
        with self.lock:
            self.image[offset:offset + length] = bytes(length)
            self.ops["write_zeroes"] += 1
        reply(0)

    def flush(self, reply):
        with self.lock:
            self.ops["flush"] += 1
        reply(0)

    def read(self, offset, length, reply):
        with self.lock:
            data = bytes(self.image[offset:offset + length])
            self.ops["read"] += 1
        reply(0, data)

    def sha256(self) -> str:
        with self.lock:
            return hashlib.sha256(self.image).hexdigest()

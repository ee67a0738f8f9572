"""``rephub.py serve`` and ``repagent.py protect`` as subprocesses, for tests and scripts.

``HubProc`` is the one way the tests and benchmarks start a hub: it
registers agents (as ``rephub.py add-agent`` does, one secret file each),
starts ``serve`` on 127.0.0.1 (keeping its port across restarts), waits
until it listens and answers status/volume/replica questions through the
control socket.  ``AgentProc`` protects QSD nodes and reports the agent's
status; it waits for its control socket on ``start``.  Both are killed with
``kill`` (SIGCONT first, so a stopped process can act on the signal) and
wait with hubtools.wait_until, the tests' one poll with a deadline.  No
pytest here: tests/faults/soak.py and bench/ run outside pytest.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from qemu_harness import short_tmpdir, wait_until  # hubtools.wait_until

import protocol as p  # noqa: E402 - qemu_harness put the repository root on sys.path
import rephub  # noqa: E402
import repagent as ra  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def spawn(argv, log_path: Path, preexec_fn=None) -> subprocess.Popen:
    """A Python script of the project as a subprocess in its own session, its
    stdout and stderr appended to ``log_path``; ``preexec_fn`` runs in the
    child before the script."""
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=preexec_fn)


def end(proc: subprocess.Popen | None, sig=signal.SIGKILL) -> int | None:
    """Send ``sig`` (after SIGCONT, so a stopped process can act on it), reap
    (SIGKILL after 15 s) and return the exit status (None: no process)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


def start_recover(hub: str, agent_id: str, secret_file, volume: str, at: str, mode: str,
                  log_path: Path, timeout: float = 60.0,
                  log_level: str = "INFO") -> tuple[subprocess.Popen, str]:
    """``repagent.py recover`` (``mode`` "--test" or "--failover") serving a unix
    socket; return the process and the URI it prints once ready ("" if it
    printed none within ``timeout``: read ``log_path``)."""
    sock = short_tmpdir("rcv") / "nbd.sock"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "repagent.py", "recover", "--hub", hub, "--agent-id", agent_id,
             "--secret-file", str(secret_file), "--volume", volume, "--at", at, mode,
             "--listen", f"unix:{sock}", "--log-level", log_level],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
            start_new_session=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    line, deadline = b"", time.monotonic() + timeout
    while not line.endswith(b"\n") and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if sel.select(timeout=0.2):
            chunk = os.read(proc.stdout.fileno(), 256)
            if not chunk:
                break
            line += chunk
    sel.close()
    return proc, line.decode().strip()


class _Logged:
    """What HubProc and AgentProc share: ``proc`` (None until started), logging to ``log``."""

    proc: subprocess.Popen | None = None
    log: Path
    TAIL = 3000       # characters ``tail`` returns by default

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL) -> None:
        end(self.proc, sig)

    def read_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, n: int | None = None) -> str:
        return self.read_log()[-(n or self.TAIL):]


class HubProc(_Logged):
    """``rephub.py serve`` on 127.0.0.1; keeps its port across restarts.

    The tests' and benchmarks' one hub launcher.  Its files are in
    ``workdir`` unless named: ``data`` (the data directory, default
    ``workdir/hub``), ``agents`` (the agents file, ``workdir/agents.json``)
    and ``log`` (stdout and stderr, appended to across restarts,
    ``workdir/hub.log``).  ``agent_ids`` are added to the agents file at
    construction, each with its secret in ``secret_files[agent_id]``
    (``secret_file`` is the first one's); with none, ``agents`` must name a
    file written already (hubtools.make_agents_file).  ``args`` are further
    ``serve`` options, ``log_level`` rephub's ``--log-level``, and
    ``preexec_fn`` runs in the child before rephub (rlimits).
    ``start_timeout`` bounds the wait for the line ``serve`` prints once it
    listens, ``request_timeout`` each control request's connect."""

    #: What ``serve`` prints on stdout once its listener and control socket are open.
    LISTENING = re.compile(rb"rephub listening on [\d.]+:(\d+)\n")

    def __init__(self, workdir: Path, agent_ids=(), args=(), *, data: Path | None = None,
                 agents: Path | None = None, log: Path | None = None, log_level="INFO",
                 preexec_fn=None, start_timeout=30.0, request_timeout=10.0):
        self.workdir = Path(workdir)
        self.data = Path(data) if data else self.workdir / "hub"
        self.agents = Path(agents) if agents else self.workdir / "agents.json"
        self.log = Path(log) if log else self.workdir / "hub.log"
        self.args, self.log_level, self.preexec_fn = list(args), log_level, preexec_fn
        self.start_timeout, self.request_timeout = start_timeout, request_timeout
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.secret_files: dict[str, Path] = {}
        for agent_id in agent_ids:
            self.add_agent(agent_id)

    def add_agent(self, agent_id: str, recover_for=()) -> Path:
        """Add ``agent_id`` to the agents file, as ``rephub.py add-agent`` does
        (``recover_for``: its ``--recover-for`` owners); return its secret file."""
        path = self.workdir / f"{agent_id}.secret"
        path.write_text(rephub.add_agent(str(self.agents), agent_id, recover_for) + "\n")
        path.chmod(0o600)           # the agent refuses a secret others can read
        self.secret_files[agent_id] = path
        return path

    @property
    def secret_file(self) -> Path:
        return next(iter(self.secret_files.values()))

    def secret(self, agent_id: str) -> bytes:
        return p.parse_secret(self.secret_files[agent_id].read_text())

    @property
    def address(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    def start(self) -> "HubProc":
        """Start ``serve`` (on the port of the last start, if any) and wait until it listens."""
        if self.alive():
            raise RuntimeError(f"rephub already runs as pid {self.proc.pid}")
        log_from = self.log.stat().st_size if self.log.exists() else 0
        self.proc = spawn(["rephub.py", "--log-level", self.log_level, "serve",
                           "--data", str(self.data), "--listen", f"127.0.0.1:{self.port}",
                           "--agents", str(self.agents), *self.args], self.log,
                          preexec_fn=self.preexec_fn)
        try:
            self.port = wait_until(lambda: self._listening_port(log_from), self.start_timeout,
                                   "rephub listening", 0.05)
        except TimeoutError as err:
            self.kill()
            raise RuntimeError(f"rephub did not listen within {self.start_timeout} s:\n"
                               f"{self.tail()}") from err
        return self

    def _listening_port(self, log_from: int) -> int | None:
        """The port this start's ``serve`` printed (in the log after ``log_from``), or None."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"rephub exited {self.proc.returncode}:\n{self.tail()}")
        with open(self.log, "rb") as f:
            f.seek(log_from)
            listening = self.LISTENING.search(f.read())
        return int(listening.group(1)) if listening else None

    def request(self, req: dict, timeout: float | None = None):
        return rephub.control_request(
            str(self.data), req, timeout=self.request_timeout if timeout is None else timeout)

    def status(self) -> dict:
        return self.request({"cmd": "status"})

    def volume(self, name: str) -> dict | None:
        for vol in self.status()["volumes"]:
            if vol["name"] == name:
                return vol
        return None

    def replica(self, name: str) -> Path:
        return self.data / "volumes" / name / "replica"

    def journal_segments(self) -> list[Path]:
        return sorted((self.data / "journal").glob("*.seg"))



class AgentProc(_Logged):
    """``repagent.py protect`` for QSD ``nodes`` ({node: volume}), connecting to ``hub_address``.

    ``hub_address`` is (host, port), or a ``HubProc`` whose current port is
    used at each ``start``.  ``sources`` ({node: NBD URI}) become
    ``--source`` options; ``reconnect_delay=None`` leaves the agent's default."""

    TAIL = 4000

    def __init__(self, workdir: Path, hub_address, secret_file: Path, qmp: Path,
                 nodes: dict[str, str], mode="async", agent_id="agent1", extra=(),
                 sources: dict[str, str] | None = None, hub_timeout=3, sync_timeout=2,
                 reconnect_delay: float | None = 1, start_timeout=30.0):
        self.state = short_tmpdir("agst")
        self.log = workdir / f"{agent_id}.log"
        self.hub_address, self.secret_file, self.qmp = hub_address, secret_file, qmp
        self.nodes, self.mode, self.agent_id, self.extra = nodes, mode, agent_id, list(extra)
        self.sources = dict(sources or {})
        self.timeouts = ["--hub-timeout", str(hub_timeout), "--sync-timeout", str(sync_timeout)]
        if reconnect_delay is not None:
            self.timeouts += ["--reconnect-delay", str(reconnect_delay)]
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    def hub_endpoint(self) -> str:
        hub = self.hub_address
        host, port = hub.address if isinstance(hub, HubProc) else hub
        return f"{host}:{port}"

    def argv(self) -> list[str]:
        return ["repagent.py", "protect", "--hub", self.hub_endpoint(), "--agent-id",
                self.agent_id, "--secret-file", str(self.secret_file), "--qmp", str(self.qmp),
                *[a for node, vol in self.nodes.items() for a in ("--node", f"{node}={vol}")],
                "--state-dir", str(self.state), "--mode", self.mode, *self.timeouts,
                "--log-level", "INFO", *self.extra,
                *[a for node, uri in self.sources.items() for a in ("--source", f"{node}={uri}")]]

    def start(self) -> "AgentProc":
        self.proc = spawn(self.argv(), self.log)
        wait_until(self._status_or_none, self.start_timeout, "repagent control socket", 0.05)
        return self

    def _status_or_none(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"repagent exited {self.proc.returncode}:\n{self.tail()}")
        try:
            return self.status()
        except (OSError, ValueError):
            return None

    def status(self) -> dict:
        return ra.query_status(str(self.state))

    def vol(self) -> dict:
        return self.status()["volumes"][0]

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.state, ignore_errors=True)

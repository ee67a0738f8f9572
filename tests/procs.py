"""``rephub.py serve`` and ``repagent.py protect`` as subprocesses, for tests and scripts.

``HubProc`` registers agents (``rephub.py add-agent``, one secret file each),
starts the hub on 127.0.0.1 (keeping its port across restarts) and answers
status/volume/replica questions through the control socket.  ``AgentProc``
protects QSD nodes and reports the agent's status.  Both wait for their
control socket on ``start`` and are killed with ``kill`` (SIGCONT first, so a
stopped process can act on the signal).  No pytest here: tests/faults/soak.py
runs outside pytest.

Used by tests/test_agent_e2e.py and tests/faults/cluster.py.
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

from qemu_harness import short_tmpdir, wait_until

import rephub  # noqa: E402 - qemu_harness put the repository root on sys.path
import repagent as ra  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def spawn(argv, log_path: Path) -> subprocess.Popen:
    """A Python script of the project as a subprocess in its own session."""
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def end(proc: subprocess.Popen | None, sig=signal.SIGKILL) -> None:
    """Send ``sig`` (after SIGCONT, so a stopped process can act on it) and reap."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start_recover(hub: str, agent_id: str, secret_file, volume: str, at: str, mode: str,
                  log_path: Path, timeout: float = 60.0) -> tuple[subprocess.Popen, str]:
    """``repagent.py recover`` (``mode`` "--test" or "--failover") serving a unix
    socket; return the process and the URI it prints once ready ("" if it
    printed none within ``timeout``: read ``log_path``)."""
    sock = short_tmpdir("rcv") / "nbd.sock"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "repagent.py", "recover", "--hub", hub, "--agent-id", agent_id,
             "--secret-file", str(secret_file), "--volume", volume, "--at", at, mode,
             "--listen", f"unix:{sock}", "--log-level", "INFO"],
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


def _tail(log: Path, n: int) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


class HubProc:
    """``rephub.py serve`` on 127.0.0.1; keeps its port across restarts.

    ``agent_ids`` are registered at construction; ``secret_files[agent_id]``
    holds each one's secret (``secret_file`` is the first one's).
    ``start_timeout`` bounds the wait for the control socket,
    ``request_timeout`` each control request's connect.  With
    ``retry_command_errors`` an error answer while waiting for the control
    socket is retried rather than raised."""

    def __init__(self, workdir: Path, agent_ids=("agent1",), args=(), start_timeout=30.0,
                 request_timeout=10.0, retry_command_errors=True):
        self.args = list(args)
        self.data = workdir / "hub"
        self.agents = workdir / "agents.json"
        self.log = workdir / "hub.log"
        self.port = 0
        self.start_timeout, self.request_timeout = start_timeout, request_timeout
        self._retry = ((OSError, ValueError, rephub.CommandError) if retry_command_errors
                       else (OSError, ValueError))
        self.proc: subprocess.Popen | None = None
        self.secret_files: dict[str, Path] = {}
        for agent_id in agent_ids:
            out = subprocess.run([sys.executable, "rephub.py", "add-agent", "--agents",
                                  str(self.agents), agent_id], cwd=ROOT, capture_output=True,
                                 text=True, timeout=30)
            secret = re.search(r"\b[0-9a-f]{64}\b", out.stdout)
            if out.returncode != 0 or not secret:
                raise RuntimeError(f"add-agent {agent_id} failed: {out}")
            path = workdir / f"{agent_id}.secret"
            path.write_text(secret.group(0) + "\n")
            self.secret_files[agent_id] = path

    @property
    def secret_file(self) -> Path:
        return next(iter(self.secret_files.values()))

    def start(self) -> "HubProc":
        self.proc = spawn(["rephub.py", "--log-level", "INFO", "serve", "--data",
                           str(self.data), "--listen", f"127.0.0.1:{self.port}",
                           "--agents", str(self.agents), *self.args], self.log)
        status = wait_until(self._status_or_none, self.start_timeout, "rephub control socket",
                            0.05)
        self.port = int(status["listen"].rsplit(":", 1)[1])
        return self

    def _status_or_none(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"rephub exited {self.proc.returncode}:\n{self.tail()}")
        try:
            return self.status()
        except self._retry:
            return None

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

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL) -> None:
        end(self.proc, sig)

    def tail(self, n=3000) -> str:
        return _tail(self.log, n)


class AgentProc:
    """``repagent.py protect`` for QSD ``nodes`` ({node: volume}), connecting to ``hub_address``.

    ``hub_address`` is (host, port), or a ``HubProc`` whose current port is
    used at each ``start``.  ``sources`` ({node: NBD URI}) become
    ``--source`` options; ``reconnect_delay=None`` leaves the agent's default."""

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
        if isinstance(self.hub_address, HubProc):
            return f"127.0.0.1:{self.hub_address.port}"
        host, port = self.hub_address
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

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig=signal.SIGKILL) -> None:
        end(self.proc, sig)

    def tail(self, n=4000) -> str:
        return _tail(self.log, n)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.state, ignore_errors=True)

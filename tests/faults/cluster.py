"""A protected-VM cluster on loopback for fault tests, with a fault proxy in the link.

    writer (QD1) ──NBD──> QSD ──mirror──> repagent ──> FaultProxy ──> rephub

``Cluster`` starts qemu-storage-daemon (the protected disk), ``rephub.py
serve`` and ``repagent.py protect`` as subprocesses (tests/procs.py), with a ``FaultProxy``
between the agent and the hub.  ``Writer`` issues random writes through
QSD's own NBD export one at a time (each is acknowledged before the next is
issued), so the order in which they enter the replication stream is known:
it records each acknowledged write in a ``StreamModel`` (tests/oracle.py),
the replica-state oracle.

Faults (``Cluster.inject``) are named by ``Fault``; each one is followed by
``converge`` (poll both status commands with a deadline) and ``check_identical``.
Used by tests/faults/test_faults.py (a few rounds in CI) and
tests/faults/soak.py (``make soak ROUNDS=N``).
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import nbd
import rephub
from faults.proxy import FaultProxy
from oracle import StreamModel, first_difference
from procs import AgentProc, HubProc
from qemu_harness import QSD, MiB, kill_all, nbd_sha256, short_tmpdir, wait_until
from smallfs import ballast, tmpfs

CHUNK = 64 * 1024
#: What repagent logs once it has set a vanished mirror job up again.
QSD_RESTART_NOTICE = "the mirror job was gone (QSD restarted)"


def last_record(segment: bytes, first_seq: int) -> tuple[int, int] | None:
    """(start, end) of the last record of a journal segment (rephub ``RECORD``
    layout): its records carry ``first_seq`` (the file's name) and on by one;
    a file written over a spare holds bytes of its earlier use after them."""
    offset, last, seq = 0, None, first_seq
    while offset + rephub.RECORD.size <= len(segment):
        fields = rephub.RECORD.unpack_from(segment, offset)
        end_ = offset + rephub.RECORD.size + fields[7]
        if fields[0] != rephub.RECORD_MAGIC or fields[4] != seq or end_ > len(segment):
            break
        last, offset, seq = (offset, end_), end_, seq + 1
    return last


class Writer(threading.Thread):
    """Random writes through QSD's export, one at a time, recorded in a StreamModel.

    A write enters ``model`` only once QSD acknowledged it; the write in
    flight when the writer is paused completes first (``pause`` waits), so
    the model is exactly the acknowledged stream.  ``marks`` records, per
    write, (issued_ns, acked_ns): between two of them the hub's state in
    sync mode is exactly a prefix of the model (the replica-state oracle).
    """

    def __init__(self, qsd: QSD, model: StreamModel, seed: int, max_length=128 * 1024,
                 gap: float = 0.002):
        super().__init__(name=f"writer-{seed}", daemon=True)
        self.qsd, self.model, self.rng = qsd, model, random.Random(seed)
        self.max_length, self.gap = max_length, gap
        self.stop_event = threading.Event()
        self.go = threading.Event()
        self.go.set()
        self.idle = threading.Event()
        self.marks: list[tuple[int, int]] = []
        #: (offset, length, data or None for zeroes) of the write issued, not yet acknowledged
        self.inflight: tuple[int, int, bytes | None] | None = None
        self.count = 0
        self.bytes = 0
        self.error: BaseException | None = None

    def pause(self, timeout: float = 60) -> None:
        """Return once no write is in progress and none starts until ``resume``."""
        self.go.clear()
        self.idle.clear()
        if not self.idle.wait(timeout) and self.is_alive():
            raise AssertionError(f"writer did not pause within {timeout} s")
        self.raise_error()

    def resume(self) -> None:
        self.go.set()

    def raise_error(self) -> None:
        if self.error is not None:
            raise AssertionError(f"writer failed: {self.error!r}") from self.error

    def run(self) -> None:
        """Writer thread: (re)connects to QSD's export after each pause."""
        try:
            while not self.stop_event.is_set():
                if not self.go.is_set():
                    self.idle.set()
                    self.go.wait(0.1)
                    continue
                with nbd.NBDClient(str(self.qsd.export_path), self.qsd.export_name,
                                   timeout=60) as client:
                    while self.go.is_set() and not self.stop_event.is_set():
                        self.one_write(client)
                        self.stop_event.wait(self.gap)   # pacing, not synchronisation
        except BaseException as err:  # noqa: BLE001 - reported by pause/stop
            self.error = err
        finally:
            self.idle.set()

    def one_write(self, client: nbd.NBDClient) -> None:
        size = self.model.size
        length = self.rng.randrange(4096, self.max_length + 1, 4096)
        offset = self.rng.randrange(0, size - length + 1, 4096)
        data = None if self.rng.random() < 0.1 else self.rng.randbytes(length)
        self.inflight = (offset, length, data)
        issued = time.time_ns()
        if data is None:
            client.write_zeroes(offset, length)
            self.model.zero(offset, length)
        else:
            client.write(offset, data)
            self.model.write(offset, data)
        self.inflight = None
        self.marks.append((issued, time.time_ns()))
        self.count += 1
        self.bytes += length

    def stop(self) -> None:
        self.stop_event.set()
        self.go.set()
        self.join(60)
        if self.is_alive():
            raise AssertionError("writer did not stop")
        self.raise_error()


class Fault(str, enum.Enum):
    KILL_HUB = "kill-hub"
    KILL_AGENT = "kill-agent"
    KILL_QSD = "kill-qsd"
    CUT = "cut-network"
    STALL_HUB = "stall-hub"
    TORN_JOURNAL = "torn-journal"
    STALL_LINK = "stall-link"
    DISK_FULL = "disk-full"       # needs Cluster(hub_fs_size=...): the hub's own disk


#: The faults any cluster can take (DISK_FULL needs the hub's data on a small fs).
LINK_AND_PROCESS_FAULTS = [f for f in Fault if f != Fault.DISK_FULL]


class Cluster:
    """QSD + agent + hub with a FaultProxy between agent and hub.

    ``volume`` is the hub's name of QSD's node; the source is always read
    through QSD's export (what the guest sees)."""

    def __init__(self, workdir: Path, size=16 * MiB, fmt="raw", mode="async", seed=1,
                 hub_args=(), agent_extra=(), writer_gap=0.002, max_write=128 * 1024,
                 hub_fs_size: int | None = None):
        self.workdir = Path(workdir)
        #: With ``hub_fs_size``, the hub's data directory is a tmpfs of that size
        #: (mounted by ``start``), which the DISK_FULL fault fills.
        self.hub_fs_size = hub_fs_size
        self.hub_fs = contextlib.ExitStack()
        self.degraded_seen: list[str] = []   # the faults status showed, per DISK_FULL
        self.writer_args = dict(gap=writer_gap, max_length=max_write)
        self.size, self.mode, self.volume = size, mode, "vol0"
        self.rng = random.Random(seed)
        self.seed = seed
        self.qmpdir = short_tmpdir("fqmp")
        agent_qmp = self.qmpdir / "qmp.sock"
        self.qsd = QSD(self.workdir / "qsd", size=size, fmt=fmt, extra_args=[
            "--chardev", f"socket,id=qmp1,path={agent_qmp},server=on,wait=off",
            "--monitor", "chardev=qmp1"])
        self.hub = HubProc(self.workdir, agent_ids=("agent1",), args=hub_args)
        self.proxy: FaultProxy | None = None
        self.agent: AgentProc | None = None
        self._agent_args = (agent_qmp, mode, list(agent_extra))
        self.model = StreamModel(size)
        self.writer: Writer | None = None
        self.faults: dict[str, int] = {}
        self.checkpoints: list[str] = []
        self.acked_checks = 0     # sync-mode hub kills checked for lost ACKed writes
        self.sync_intervals: list[tuple[int, int]] = []   # writer.marks index ranges

    # -- life cycle -------------------------------------------------------------

    def start(self) -> "Cluster":
        if self.hub_fs_size is not None:
            self.hub_fs.enter_context(tmpfs(self.hub.data, self.hub_fs_size))
        self.qsd.start()
        self.hub.start()
        self.proxy = FaultProxy(("127.0.0.1", self.hub.port)).start()
        qmp, mode, extra = self._agent_args
        self.agent = AgentProc(self.workdir, self.proxy.address,
                               self.hub.secret_files["agent1"], qmp,
                               {self.qsd.node: self.volume}, mode=mode, extra=extra).start()
        self.writer = Writer(self.qsd, self.model, self.seed, **self.writer_args)
        return self

    def close(self) -> None:
        if self.writer is not None and self.writer.is_alive():
            self.writer.stop_event.set()
            self.writer.go.set()
        self.qsd.kill()    # first: a QSD quitting with its target gone waits 5 s
        if self.agent is not None:
            self.agent.close()
        self.hub.kill()
        if self.proxy is not None:
            self.proxy.stop()
        if self.writer is not None and self.writer.ident is not None:
            self.writer.join(10)
        self.qsd.close()
        kill_all()
        shutil.rmtree(self.qmpdir, ignore_errors=True)
        self.hub_fs.close()

    def __enter__(self) -> "Cluster":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def logs(self) -> str:
        return (f"--- hub log ---\n{self.hub.tail()}\n--- agent log ---\n"
                f"{self.agent.tail() if self.agent else ''}")

    # -- convergence ----------------------------------------------------------------

    def quiet(self) -> bool:
        """Agent: attached, nothing dirty or queued, job ready; hub: consistent, applied."""
        try:
            st = self.agent.status()
            a = st["volumes"][0]
            if not (a["attached"] and a["dirty_bytes"] == 0 and a["queue_frames"] == 0
                    and st["pending_writes"] == 0 and a["job"] == "ready"
                    and a["job_remaining_bytes"] == 0 and not a["job_paused"]):
                return False
            h = self.hub.volume(self.volume)
        except (OSError, ValueError, KeyError, IndexError, rephub.CommandError):
            return False
        return (h is not None and h["state"] == "consistent" and h["lag_bytes"] == 0
                and not (h["sync"] or {}).get("running"))

    def converge(self, timeout: float = 90.0) -> float:
        """Poll until quiet (writer paused); return how long it took."""
        start = time.monotonic()
        try:
            wait_until(self.quiet, timeout, "replication to converge", 0.1)
        except TimeoutError:
            raise AssertionError(f"did not converge in {timeout} s: agent "
                                 f"{self._safe(self.agent.status)}\nhub "
                                 f"{self._safe(lambda: self.hub.volume(self.volume))}\n"
                                 f"{self.logs()}") from None
        return time.monotonic() - start

    @staticmethod
    def _safe(fn):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - diagnostics only
            return f"<{err!r}>"

    def source_sha256(self) -> str:
        return nbd_sha256(str(self.qsd.export_path), self.qsd.export_name)

    def replica_sha256(self) -> str:
        digest = hashlib.sha256()
        with open(self.hub.replica(self.volume), "rb") as f:
            while block := f.read(4 * MiB):
                digest.update(block)
        return digest.hexdigest()

    def check_identical(self) -> None:
        """Replica == source == oracle (the model of every acknowledged write)."""
        source, replica = self.source_sha256(), self.replica_sha256()
        expected = self.model.sha256_at()
        if source != expected:
            raise AssertionError("the source differs from the model of acknowledged writes "
                                 "(the workload itself lost a write)")
        if replica != source:
            raise AssertionError(f"replica differs from the source in chunks "
                                 f"{self.differing_chunks()[:20]}\n{self.logs()}")

    def differing_chunks(self) -> list[int]:
        out = []
        with nbd.NBDClient(str(self.qsd.export_path), self.qsd.export_name) as client, \
                open(self.hub.replica(self.volume), "rb") as f:
            for offset in range(0, self.size, CHUNK):
                if client.read(offset, CHUNK) != f.read(CHUNK).ljust(CHUNK, b"\0"):
                    out.append(offset)
        return out

    def explain(self, replica: bytes, acked: int) -> str:
        """Which writes of the model the replica lacks or has beyond ``acked``."""
        missing, extra = [], []
        for i, op in enumerate(self.model.ops):
            data = op.data if op.data is not None else bytes(op.length)
            have = replica[op.offset:op.offset + op.length] == data
            later = any(o.offset < op.offset + op.length and op.offset < o.offset + o.length
                        for o in self.model.ops[i + 1:acked])
            if i < acked and not have and not later:
                missing.append((i, op.offset, op.length, op.data is None))
            if i >= acked and have:
                extra.append((i, op.offset, op.length, op.data is None))
        return (f"writes acknowledged but missing (index, offset, length, zero): "
                f"{missing[:10]}; writes after the ack point present: {extra[:10]}")

    def resync_counter(self) -> int:
        """Bytes of READ_REPLY data the running agent has sent (its process's count)."""
        try:
            return self.agent.vol()["counters"].get("read_reply_bytes", 0)
        except (OSError, ValueError, KeyError, IndexError):
            return 0

    def checkpoint(self, name: str) -> None:
        """A named point at the current end of the stream (writer paused, converged)."""
        self.hub.request({"cmd": "checkpoint", "volume": self.volume, "name": name})
        self.model.checkpoint(name)
        self.checkpoints.append(name)

    def export(self, at: str, output: Path) -> bytes:
        self.hub.request({"cmd": "export", "volume": self.volume, "at": at,
                          "output": str(output)}, timeout=60)
        data = output.read_bytes()
        output.unlink()
        return data.ljust(self.size, b"\0")

    # -- faults ------------------------------------------------------------------------

    def inject(self, fault: Fault, hold: float = 1.0) -> None:
        """Inject ``fault`` (the writer keeps writing unless QSD is the victim)."""
        self.faults[fault.value] = self.faults.get(fault.value, 0) + 1
        getattr(self, "fault_" + fault.name.lower())(hold)

    def fault_kill_hub(self, hold: float) -> None:
        if self.mode == "sync" and self.agent.status()["mode"] == "sync":  # not degraded
            self.acked_checks += 1
            self.kill_hub_check_acked()
            return
        self.hub.kill(signal.SIGKILL)
        time.sleep(hold)   # the outage itself (the writer keeps going)
        self.hub.start()

    def kill_hub_check_acked(self) -> int:
        """Sync mode: SIGKILL the hub under writes, freeze the agent (it cannot
        resend), restart the hub: its replica must be a prefix of the stream
        holding every write QEMU acknowledged before the kill.  Returns that prefix."""
        acked = len(self.model.ops)    # prefix lengths count from the model's base
        self.hub.kill(signal.SIGKILL)
        self.agent.proc.send_signal(signal.SIGSTOP)
        try:
            last = len(self.model.ops)   # later writes wait on the frozen agent
            inflight = self.writer.inflight  # may have reached the hub, unacknowledged
            self.hub.start()
            wait_until(lambda: self.hub.volume(self.volume)["lag_bytes"] == 0, 60, "hub replay")
            replica = self.hub.replica(self.volume).read_bytes().ljust(self.size, b"\0")
            for k in range(acked, last + 1):
                if replica == self.model.image_at(k):
                    return k
            if inflight is not None:
                offset, length, data = inflight
                image = bytearray(self.model.image_at(last))
                image[offset:offset + length] = data if data is not None else bytes(length)
                if replica == image:
                    return last + 1
            raise AssertionError(
                f"sync mode: after a hub kill the replica is no stream prefix holding the "
                f"{acked} acknowledged writes (of {last} seen): "
                f"{first_difference(replica, self.model.image_at(acked))}; "
                f"{self.explain(replica, acked)}\n{self.logs()}")
        finally:
            self.agent.proc.send_signal(signal.SIGCONT)

    def fault_torn_journal(self, hold: float) -> None:
        """SIGKILL the hub, then leave a torn record at the end of its last journal
        segment, as a power cut in the middle of an append would: right after
        its last record comes a random number of bytes of a copy of it.

        A tear can only hit bytes the hub never made durable, hence never
        ACKed; cutting into ACKed records would model a disk that lies about
        fdatasync, which no replication protocol survives.  The hub must drop
        the torn tail at start and go on (checked by convergence and sha256)."""
        self.hub.kill(signal.SIGKILL)
        segs = self.hub.journal_segments()
        if segs:
            data = segs[-1].read_bytes()
            last = last_record(data, int(segs[-1].stem))
            if last is not None:
                record = data[last[0]:last[1]]
                with open(segs[-1], "r+b") as f:   # where the next append would go
                    f.seek(last[1])
                    f.write(record[:self.rng.randrange(1, len(record))])
        time.sleep(hold)
        self.hub.start()

    def fault_kill_agent(self, hold: float) -> None:
        self.agent.kill(signal.SIGKILL)
        time.sleep(hold)
        self.agent.start()

    def fault_kill_qsd(self, hold: float) -> None:
        """SIGKILL QSD with the writer paused (an in-flight write's fate is unknown
        to the guest too), restart it on the same image; the agent must set the
        mirror up again and the hub verify."""
        noticed = self.agent.log.read_text(errors="replace").count(QSD_RESTART_NOTICE)
        self.writer.pause()
        self.qsd.kill(signal.SIGKILL)
        time.sleep(hold)
        self.qsd.start()
        # Writes from here until the agent sets the mirror up again escape it:
        # only the hub's verify can find them.
        self.writer.resume()
        wait_until(lambda: self.agent.log.read_text(errors="replace").count(
            QSD_RESTART_NOTICE) > noticed, 60, "the agent to notice the QSD restart", 0.1)

    def fault_cut(self, hold: float) -> None:
        self.proxy.partition()
        time.sleep(hold)
        self.proxy.heal()

    def fault_disk_full(self, hold: float) -> None:
        """Fill the hub's file system under writes until status says degraded;
        at a random moment restart the hub by SIGTERM, SIGKILL or not (in turn); then
        free the space: the hub must take writes again by itself and the
        agent's refused writes be resynced (checked by converge and sha256)."""
        space = ballast(self.hub.data, 2 * MiB)
        wait_until(lambda: self._degraded(), 60, "the hub to report its disk full", 0.05)
        # Each kind of restart in turn: SIGTERM, SIGKILL, none.
        restart = (signal.SIGTERM, signal.SIGKILL, None)[(self.faults[Fault.DISK_FULL.value] - 1)
                                                         % 3]
        if restart is not None:
            time.sleep(self.rng.uniform(0, hold))   # a random moment while full
            self.hub.kill(restart)
            self.hub.start()
        time.sleep(self.rng.uniform(0, hold))
        space.unlink()

    def _degraded(self) -> bool:
        try:
            faults = [d["fault"] for d in self.hub.status().get("degraded", ())]
        except (OSError, ValueError, rephub.CommandError):
            return False
        if faults:
            self.degraded_seen.append(", ".join(sorted(set(faults))))
        return bool(faults)

    def fault_stall_hub(self, hold: float) -> None:
        self.hub.proc.send_signal(signal.SIGSTOP)
        time.sleep(hold)
        self.hub.proc.send_signal(signal.SIGCONT)

    def fault_stall_link(self, hold: float) -> None:
        self.proxy.stall()
        time.sleep(hold)
        self.proxy.resume()

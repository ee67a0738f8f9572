#!/usr/bin/env python3
"""Initial sync and resync through repagent -> rephub, against nbdcopy and qemu-img convert.

    python3 bench/bench_sync.py [--size-mib 1024] [--sparse-data-mib 32] [--sparse-huge-gib 1024]
                                 [--rounds 5] [--json]

Every figure is measured in one run, from the same qemu-storage-daemon (QSD)
export of the same raw image (all of it in the page cache, for every copy):

dense volume (``--size-mib`` of random data)
  nbdcopy     ``nbdcopy SRC DST`` (Debian libnbd-bin, default options) from
              QSD's export into ``qemu-nbd`` serving a fresh raw file;
  qemu-img    ``qemu-img convert -n -f raw -O raw SRC DST`` from QSD's export
              into the same kind of NBD target (qemu-img can write an NBD
              target directly; ``-n`` because the target exists);
  hub         ``rephub.py serve`` on 127.0.0.1 in a temp dir, then
              ``repagent.py protect --source disk0=<QSD's export>``: the time
              from starting the agent to the hub reporting the volume
              ``consistent`` (every byte durable in the hub's journal).
  Each baseline's time includes an fdatasync of its target file after the
  copy, so all three end with the data on disk.  Printed as MiB/s of volume
  size and as the ratio to the faster baseline (issue target >= 1.0x): the
  median over the rounds of the ratio within each round, since the speed of
  a machine with shared cores drifts more between rounds than within one.

sparse volume (same size, ``--sparse-data-mib`` of random data in 64 KiB
pieces scattered over it, the rest holes)
  The same three copies.  The issue asks for a sync time proportional to the
  data, not the size: printed as the hub's time per data byte divided by the
  dense run's time per data byte (1.0 = proportional), from the agent's start
  (which includes its fixed set-up: QMP, mirror job, handshake) and for the
  sync job alone; and the bytes the hub READ (its ``bytes_fetched``; with
  feature EXTENTS the zero extents are not READ) and the bytes the agent
  sent as data.

sparse volume, ``--sparse-scale`` times the size (the same data)
  The hub's sync only (no baselines): its sync job's time divided by the
  sparse run's (1.0 = the size does not matter, only the data).

sparse volume of ``--sparse-huge-gib`` (1 TiB; the same data)
  The same, for a disk as large as a real one: what is left of the cost of
  size is the hub's walk of the holes, one EXTENT_QUERY per GiB and one
  SYNCED per hole (a new replica's holes need no ZERO record).

resync after a hub outage (on the sparse volume, once it is consistent)
  The hub is killed (SIGKILL); N writes go through QSD's export while it is
  down; the hub restarts on the same port and the agent reconnects.  The hub
  picks a DIRTY plan; its status gives the bytes that plan fetched.  Printed:
  bytes written (dirtied), bytes of the 64 KiB chunks they touch (what a
  resync of whole chunks would resend), the 4 KiB blocks the agent tracked,
  and bytes resent (issue target: <= 1.5x dirtied).  Two workloads: 4 KiB
  random writes (worst case for 64 KiB chunks) and 1 MiB aligned writes.

At the end the hub's replica is compared (sha256) with the source image, so a
fast but wrong sync cannot pass.  With ``--json`` a last line
``BENCH-JSON {...}`` carries the figures for bench/report.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import nbd  # noqa: E402
import repagent  # noqa: E402
import rephub  # noqa: E402
from qemu_harness import QSD, MiB, QemuNBD, create_image, kill_all, short_tmpdir  # noqa: E402

KiB = 1024
CHUNK = 64 * KiB            # the agent's default dirty-tracking granularity
VOLUME = "bench"
AGENT_ID = "bench"
POLL = 0.05                 # seconds between status polls while timing
SYNC_TIMEOUT = 900.0        # the longest any one sync may take before the bench gives up
TOOL_TIMEOUT = 600.0        # one nbdcopy / qemu-img run
CONTROL_TIMEOUT = 10.0      # one status request to the hub or the agent


# ---------------------------------------------------------------------------
# Volumes

def make_dense(path: Path, size: int) -> int:
    """A raw image of ``size`` random bytes; returns the data bytes (= size)."""
    with open(path, "wb") as f:
        for _ in range(0, size, 4 * MiB):
            f.write(os.urandom(4 * MiB))
    return size


def make_sparse(path: Path, size: int, data: int, seed: int = 9) -> int:
    """A raw image of ``size`` bytes, holes except ``data`` random bytes in
    CHUNK pieces at distinct random offsets; returns the data bytes."""
    rng = random.Random(seed)
    chunks = rng.sample(range(size // CHUNK), data // CHUNK)
    with open(path, "wb") as f:
        f.truncate(size)
        for c in sorted(chunks):
            f.seek(c * CHUNK)
            f.write(os.urandom(CHUNK))
    return len(chunks) * CHUNK


def content_sha256(path: Path) -> str:
    """sha256 of a file's bytes read through its data extents only: its size,
    then each CHUNK-aligned block holding a byte that is not zero, with its
    offset.  Files with the same bytes have the same digest wherever their
    holes lie, and a sparse 1 TiB image is read in the time its data takes."""
    digest = hashlib.sha256()
    zero = bytes(CHUNK)
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        digest.update(size.to_bytes(8, "big"))
        done = 0                    # the blocks before it are summed
        for start, n in rephub.data_extents(fd, 0, size):
            block = max(start - start % CHUNK, done)
            while block < start + n:
                data = os.pread(fd, CHUNK, block)
                if data != zero[:len(data)]:
                    digest.update(block.to_bytes(8, "big") + data)
                block += CHUNK
            done = block
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# Baselines: C tools copying QSD's export into qemu-nbd serving a fresh file

def copy_baseline(tool: str, qsd: QSD, work: Path, source_sha: str) -> float:
    """Seconds for ``tool`` to copy QSD's export into a fresh NBD target, plus
    the fdatasync of the target's file (checked against ``source_sha``)."""
    target = work / f"{tool}-target.raw"
    create_image(target, qsd.size)
    server = QemuNBD(target, export_name="tgt").start()
    dst = f"nbd+unix:///tgt?socket={server.export_path}"
    argv = {"nbdcopy": ["nbdcopy", qsd.uri, dst],
            "qemu-img": ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", qsd.uri, dst]}[tool]
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr}")
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        elapsed = time.perf_counter() - t0
    finally:
        server.stop()
    if content_sha256(target) != source_sha:
        raise RuntimeError(f"{tool} produced a copy that differs from the source")
    target.unlink()
    return elapsed


# ---------------------------------------------------------------------------
# rephub and repagent as subprocesses

def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (the hub restarts on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def control(path: str, request: bytes, hub: bool) -> dict:
    """One request on a unix control socket, every wait bounded.

    The hub answers JSON lines, the last one carrying "ok"; the agent answers
    one JSON document ending with a newline."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(CONTROL_TIMEOUT)
        s.connect(path)
        s.sendall(request)
        buf = bytearray()
        while True:
            data = s.recv(1 << 16)
            if not data:
                break
            buf += data
            if not buf.endswith(b"\n"):
                continue
            if not hub:
                return json.loads(buf)
            last = json.loads(buf.rstrip(b"\n").rsplit(b"\n", 1)[-1])
            if "ok" in last:
                return last
    raise ConnectionError(f"{path} closed without an answer")


def hub_volume(data_dir: Path) -> dict | None:
    """The bench volume's entry in the hub's status, None if there is none yet."""
    reply = control(str(data_dir / "control.sock"), b'{"cmd": "status"}\n', hub=True)
    if not reply.get("ok"):
        raise RuntimeError(f"hub status failed: {reply}")
    for vol in reply["result"]["volumes"]:
        if vol["name"] == VOLUME:
            return vol
    return None


def agent_volume(state_dir: Path) -> dict:
    return control(str(state_dir / "control.sock"), b"status\n", hub=False)["volumes"][0]


def poll(predicate, timeout: float, what: str):
    """Call ``predicate`` every POLL seconds until it returns a true value."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (OSError, ValueError, KeyError, IndexError):
            value = None            # the daemon is not up yet
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL)


def cpu_seconds(proc: subprocess.Popen) -> float:
    """User + system CPU seconds ``proc`` has used so far (/proc/PID/stat)."""
    with open(f"/proc/{proc.pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spawn(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def end(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    """Stop ``proc`` with ``sig``; SIGKILL if it has not exited within 30 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class Replication:
    """QSD + rephub + repagent on one image; ``sync()`` times the initial sync."""

    def __init__(self, image: Path, size: int, work: Path):
        self.work = work
        self.sockets = short_tmpdir("bsync")
        self.state = self.sockets / "state"
        self.state.mkdir()
        self.agent_qmp = self.sockets / "qmp.sock"
        self.data = work / "hub"
        self.port = free_port()
        self.qsd = QSD(work / "qsd", size=size, image=image, extra_args=[
            "--chardev", f"socket,id=qmp1,path={self.agent_qmp},server=on,wait=off",
            "--monitor", "chardev=qmp1"])
        self.hub: subprocess.Popen | None = None
        self.agent: subprocess.Popen | None = None

    def start_qsd(self) -> QSD:
        return self.qsd.start()

    def start_hub(self) -> None:
        agents = self.work / "agents"
        if not agents.exists():
            out = subprocess.run([sys.executable, "rephub.py", "add-agent", "--agents",
                                  str(agents), AGENT_ID], cwd=ROOT, capture_output=True,
                                 text=True, check=True, timeout=60)
            (self.work / "secret").write_text(out.stdout.strip().split()[-1] + "\n")
            (self.work / "secret").chmod(0o600)   # the agent refuses a secret others can read
        self.hub = spawn(["rephub.py", "--log-level", "INFO", "serve", "--data", str(self.data),
                          "--listen", f"127.0.0.1:{self.port}", "--agents", str(agents)],
                         self.work / "hub.log")
        poll(lambda: self.hub.poll() is None and
             control(str(self.data / "control.sock"), b'{"cmd": "status"}\n', hub=True).get("ok"),
             60, "rephub to answer status")

    def sync(self) -> dict:
        """Start the agent; wait for the volume to be consistent; the figures."""
        hub_cpu0 = cpu_seconds(self.hub)
        t0 = time.perf_counter()
        self.agent = spawn(["repagent.py", "protect", "--hub", f"127.0.0.1:{self.port}",
                            "--agent-id", AGENT_ID, "--secret-file", str(self.work / "secret"),
                            "--qmp", str(self.agent_qmp), "--node", f"disk0={VOLUME}",
                            "--source", f"disk0={self.qsd.uri}", "--state-dir", str(self.state),
                            "--mode", "async", "--log-level", "INFO"], self.work / "agent.log")

        def consistent():
            if self.agent.poll() is not None:
                raise RuntimeError(f"repagent exited {self.agent.returncode}; see "
                                   f"{self.work / 'agent.log'}")
            vol = hub_volume(self.data)
            return vol if vol and vol["state"] == "consistent" and vol["sync"] \
                and not vol["sync"]["running"] else None
        vol = poll(consistent, SYNC_TIMEOUT, "the initial sync")
        elapsed = time.perf_counter() - t0
        cpu = {"hub_cpu_s": cpu_seconds(self.hub) - hub_cpu0, "agent_cpu_s": cpu_seconds(self.agent)}
        # The applier copies the journal into the replica behind the sync: how
        # far behind it was, and when the replica had everything.
        lag = vol["lag_bytes"]
        poll(lambda: hub_volume(self.data)["lag_bytes"] == 0, 300, "the hub to apply its journal")
        applied = time.perf_counter() - t0
        sync = vol["sync"]
        job_s = sync["bytes_done"] / sync["rate"] if sync["rate"] else elapsed
        return {"seconds": elapsed, "job_seconds": job_s, "plan": sync["plan"],
                "bytes_fetched": sync["bytes_fetched"],
                "agent_data_bytes": agent_volume(self.state)["counters"].get(
                    "read_reply_bytes", 0), "lag_bytes": lag, "applied_seconds": applied,
                **cpu}

    def outage(self, writes: list[tuple[int, bytes]]) -> dict:
        """Kill the hub, write ``writes`` through QSD's export, restart the hub;
        return what the resync fetched."""
        end(self.hub, signal.SIGKILL)
        with nbd.NBDClient(str(self.qsd.export_path), self.qsd.export_name) as client:
            for offset, data in writes:
                client.write(offset, data)
        tracked = poll(lambda: agent_volume(self.state)["dirty_block_bytes"] or None, 30,
                       "the agent to track the writes")
        t0 = time.perf_counter()
        self.start_hub()

        def resynced():
            vol = hub_volume(self.data)
            return vol if vol and vol["state"] == "consistent" and vol["sync"] \
                and not vol["sync"]["running"] else None
        vol = poll(resynced, SYNC_TIMEOUT, "the resync after the outage")
        touched = {off // CHUNK for offset, data in writes
                   for off in range(offset - offset % CHUNK, offset + len(data), CHUNK)}
        return {"plan": vol["sync"]["plan"], "seconds": time.perf_counter() - t0,
                "dirtied": sum(len(d) for _, d in writes), "chunk_bytes": len(touched) * CHUNK,
                "agent_tracked": tracked, "resent": vol["sync"]["bytes_fetched"]}

    def check_replica(self, source_sha: str | None = None) -> None:
        """Wait until the hub applied everything, then compare replica and source."""
        poll(lambda: (hub_volume(self.data) or {}).get("lag_bytes") == 0, 300,
             "the hub to apply its journal")
        replica = self.data / "volumes" / VOLUME / "replica"
        if content_sha256(replica) != (source_sha or content_sha256(self.qsd.image)):
            raise RuntimeError(f"the hub's replica {replica} differs from the source image")

    def close(self) -> None:
        try:
            self.qsd.kill()         # first: the mirror must not wait on a stopped agent
            end(self.agent)
            end(self.hub)
        finally:
            self.qsd.close()
            shutil.rmtree(self.sockets, ignore_errors=True)


# ---------------------------------------------------------------------------

def run_case(name: str, work: Path, size: int, make, rounds: int, outages=(),
             baselines=("nbdcopy", "qemu-img")) -> dict:
    """``baselines`` and the hub's initial sync on one image, ``rounds`` times
    interleaved (fresh QSD, target, hub and agent each round); the outages
    after the last round's sync.  Returns the medians, the hub figures of the
    median round and every round's times."""
    case = work / name
    case.mkdir()
    image = case / "source.raw"
    data = make(image, size)
    source_sha = content_sha256(image)
    runs = []
    for r in range(rounds):
        base = case / f"round{r}"
        base.mkdir()
        rep = Replication(image, size, base)
        try:
            qsd = rep.start_qsd()
            run = {tool: copy_baseline(tool, qsd, base, source_sha) for tool in baselines}
            rep.start_hub()
            run["hub"] = rep.sync()
            rep.check_replica(source_sha)
            if r == rounds - 1:
                run["outages"] = [rep.outage(w) for w in outages]
                if outages:
                    rep.check_replica()
            runs.append(run)
        finally:
            rep.close()
            shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(case, ignore_errors=True)
    median_run = sorted(runs, key=lambda run: run["hub"]["seconds"])[(len(runs) - 1) // 2]
    return {"data_bytes": data, "hub": median_run["hub"], "outages": runs[-1]["outages"],
            **{tool: statistics.median_low(run[tool] for run in runs) for tool in baselines},
            "rounds": {k: [run[k]["seconds"] if k == "hub" else run[k] for run in runs]
                       for k in (*baselines, "hub")}}


def outage_writes(size: int, seed: int) -> list[list[tuple[int, bytes]]]:
    rng = random.Random(seed)
    # Distinct offsets, so the bytes written are the bytes dirtied.
    small = [(i * 4 * KiB, os.urandom(4 * KiB)) for i in rng.sample(range(size // (4 * KiB)), 2048)]
    large = [(i * MiB, os.urandom(MiB)) for i in rng.sample(range(size // MiB), 32)]
    return [small, large]


def figure(name, value, unit, baseline_name=None, baseline=None, ratio=None,
           target=None, met=None, note=None) -> dict:
    return {k: v for k, v in dict(name=name, value=value, unit=unit, baseline_name=baseline_name,
                                  baseline=baseline, ratio=ratio, target=target, met=met,
                                  note=note).items() if v is not None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024, help="volume size")
    ap.add_argument("--sparse-data-mib", type=int, default=32,
                    help="data in the sparse volume")
    ap.add_argument("--sparse-scale", type=int, default=4,
                    help="the size factor of the second sparse volume (same data)")
    ap.add_argument("--sparse-huge-gib", type=int, default=1024,
                    help="the size of a third sparse volume (same data); 0: none")
    ap.add_argument("--rounds", type=int, default=5,
                    help="interleaved rounds of (nbdcopy, qemu-img, hub) per volume; "
                         "medians are compared")
    ap.add_argument("--json", action="store_true",
                    help="also print a BENCH-JSON line for bench/report.py")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: expected at least 1")
    size = args.size_mib * MiB
    work = short_tmpdir("bench-sync")
    try:
        dense = run_case("dense", work, size, make_dense, args.rounds)
        sparse = run_case("sparse", work, size,
                          lambda path, n: make_sparse(path, n, args.sparse_data_mib * MiB),
                          args.rounds, outages=outage_writes(size, seed=5))
        bigger = run_case("sparse-scaled", work, size * args.sparse_scale,
                          lambda path, n: make_sparse(path, n, args.sparse_data_mib * MiB),
                          args.rounds, baselines=())
        huge = run_case("sparse-huge", work, args.sparse_huge_gib * 1024 * MiB,
                        lambda path, n: make_sparse(path, n, args.sparse_data_mib * MiB),
                        args.rounds, baselines=()) if args.sparse_huge_gib else None
    finally:
        kill_all()
        shutil.rmtree(work, ignore_errors=True)

    figures = []
    mib = size / MiB
    d_lag = dense["hub"]["lag_bytes"]
    print(f"bench_sync: {args.size_mib} MiB volume, QSD raw image exported on a unix socket, "
          f"hub on 127.0.0.1; times include an fdatasync of the copy; medians of {args.rounds} "
          "rounds")
    print(f"{'volume':<8} {'copy':<10} {'seconds':>8} {'MiB/s':>8} {'x best C':>9}  rounds (s)")
    for label, case in (("dense", dense), ("sparse", sparse)):
        best_name = min(("nbdcopy", "qemu-img"), key=lambda k: case[k])
        best = case[best_name]
        for what in ("nbdcopy", "qemu-img", "hub"):
            t = case[what]["seconds"] if what == "hub" else case[what]
            each = " ".join(f"{x:.2f}" for x in case["rounds"][what])
            print(f"{label:<8} {what:<10} {t:>8.2f} {mib / t:>8.0f} {best / t:>9.2f}  [{each}]")
        ratio = best / case["hub"]["seconds"]
        if label == "dense":
            # This machine's speed drifts between rounds (shared cores): each
            # round's baseline and hub run back to back, so the ratio within a
            # round is the figure; the median of the rounds' ratios is reported.
            paired = statistics.median(b / h for b, h in zip(case["rounds"][best_name],
                                                              case["rounds"]["hub"]))
            print(f"{label:<8} hub / {best_name} within each round: "
                  + " ".join(f"{b / h:.2f}" for b, h in zip(case["rounds"][best_name],
                                                            case["rounds"]["hub"]))
                  + f"; median {paired:.2f}x (ratio of the medians {ratio:.2f}x)")
            figures.append(figure(
                "initial sync, 1 GiB random data" if args.size_mib == 1024 else
                f"initial sync, {args.size_mib} MiB random data",
                round(mib / case["hub"]["seconds"], 1), "MiB/s", best_name,
                round(mib / best, 1), round(paired, 2), ">= 1.0x", paired >= 1.0,
                note=f"ratio: median over {args.rounds} rounds of {best_name}'s time / the "
                     "hub's time in the same round ("
                     + " ".join(f"{b / h:.2f}" for b, h in zip(case["rounds"][best_name],
                                                               case["rounds"]["hub"]))
                     + f"; ratio of the medians {ratio:.2f}x); "
                     "hub rounds " + " ".join(f"{mib / x:.0f}" for x in case["rounds"]["hub"])
                     + f" MiB/s, {best_name} rounds "
                     + " ".join(f"{mib / x:.0f}" for x in case["rounds"][best_name])
                     + " MiB/s"))
        else:
            figures.append(figure(
                f"initial sync, sparse ({args.sparse_data_mib} MiB data)",
                round(mib / case["hub"]["seconds"], 1), "MiB/s", best_name,
                round(mib / best, 1), round(ratio, 2),
                note="the C tools skip holes by NBD block status"))
    other = ("nbdcopy", "qemu-img")
    print(f"CPU seconds during the initial sync (2 = both cores busy the whole time):\n"
          f"  dense  hub {dense['hub']['hub_cpu_s']:.1f} s + agent {dense['hub']['agent_cpu_s']:.1f} s"
          f" in {dense['hub']['seconds']:.1f} s = "
          f"{(dense['hub']['hub_cpu_s'] + dense['hub']['agent_cpu_s']) / dense['hub']['seconds']:.2f}"
          f" cores of {os.cpu_count()}")
    print(f"  sparse hub {sparse['hub']['hub_cpu_s']:.1f} s + agent "
          f"{sparse['hub']['agent_cpu_s']:.1f} s in {sparse['hub']['seconds']:.1f} s")
    print(f"replica applied: dense {d_lag / MiB:.0f} MiB still unapplied when consistent, "
          f"all applied after {dense['hub']['applied_seconds']:.1f} s; sparse after "
          f"{sparse['hub']['applied_seconds']:.1f} s")
    print(f"dense baselines: nbdcopy {dense['nbdcopy']:.2f} s, qemu-img convert "
          f"{dense['qemu-img']:.2f} s; faster: {min(other, key=lambda k: dense[k])}")

    d, s = dense["hub"], sparse["hub"]
    per_dense = d["seconds"] / dense["data_bytes"]
    per_sparse = s["seconds"] / sparse["data_bytes"]
    prop = per_sparse / per_dense
    prop_job = (s["job_seconds"] / sparse["data_bytes"]) / (d["job_seconds"] / dense["data_bytes"])
    print(f"sparse: {sparse['data_bytes'] / MiB:.0f} MiB data in {args.size_mib} MiB: hub "
          f"{s['seconds']:.2f} s (sync job {s['job_seconds']:.2f} s) vs dense {d['seconds']:.2f} s "
          f"(job {d['job_seconds']:.2f} s)")
    print(f"  time per data byte, sparse / dense: {prop:.2f}x from agent start, "
          f"{prop_job:.2f}x for the sync job alone (1.00x = proportional to data)")
    print(f"  hub READ {s['bytes_fetched'] / MiB:.0f} MiB (zero replies counted), agent sent "
          f"{s['agent_data_bytes'] / MiB:.1f} MiB as data; dense: fetched "
          f"{d['bytes_fetched'] / MiB:.0f} MiB, sent {d['agent_data_bytes'] / MiB:.0f} MiB")
    figures.append(figure("sparse sync job: time per data byte vs dense", round(prop_job, 2),
                          "x", "dense time per data byte", 1.0, round(prop_job, 2),
                          "<= 2x (proportional to data)", prop_job <= 2.0,
                          note=f"from the agent's start {prop:.2f}x ({s['seconds']:.2f} s, of "
                               f"which the sync job {s['job_seconds']:.2f} s); hub READ "
                               f"{s['bytes_fetched'] / MiB:.0f} MiB, agent sent "
                               f"{s['agent_data_bytes'] / MiB:.1f} MiB as data"))
    b = bigger["hub"]
    scale = b["job_seconds"] / s["job_seconds"]
    print(f"  {args.sparse_scale}x the size, the same data: sync job {b['job_seconds']:.2f} s "
          f"vs {s['job_seconds']:.2f} s = {scale:.2f}x (1.00x = the size does not matter); "
          f"agent sent {b['agent_data_bytes'] / MiB:.1f} MiB as data")
    figures.append(figure(f"sparse sync job, {args.sparse_scale}x the size with the same "
                          f"{args.sparse_data_mib} MiB of data", round(b["job_seconds"], 2), "s",
                          f"{args.size_mib} MiB volume", round(s["job_seconds"], 2),
                          round(scale, 2), "<= 1.5x (time follows the data, not the size)",
                          scale <= 1.5,
                          note=f"agent sent {b['agent_data_bytes'] / MiB:.1f} MiB as data; "
                               f"median of {args.rounds} rounds"))
    if huge is not None:
        h = huge["hub"]
        queries = -(-args.sparse_huge_gib * 1024 * MiB // rephub.EXTENT_SPAN)
        print(f"  {args.sparse_huge_gib} GiB, the same data: sync job {h['job_seconds']:.2f} s "
              f"vs {s['job_seconds']:.2f} s = {h['job_seconds'] / s['job_seconds']:.2f}x; "
              f"{queries} EXTENT_QUERYs and a SYNCED per hole; agent sent "
              f"{h['agent_data_bytes'] / MiB:.1f} MiB as data")
        figures.append(figure(f"sparse sync job, {args.sparse_huge_gib} GiB volume with the same "
                              f"{args.sparse_data_mib} MiB of data", round(h["job_seconds"], 2),
                              "s", f"{args.size_mib} MiB volume", round(s["job_seconds"], 2),
                              round(h["job_seconds"] / s["job_seconds"], 2),
                              note=f"what is left of the cost of size: {queries} "
                                   f"EXTENT_QUERYs (one per {rephub.EXTENT_SPAN // MiB // 1024} "
                                   f"GiB) and a SYNCED per hole, no ZERO record on a new "
                                   f"replica; median of {args.rounds} rounds"))
    sent_ratio = s["agent_data_bytes"] / sparse["data_bytes"]
    figures.append(figure("sparse sync: bytes the agent sent as data", s["agent_data_bytes"],
                          "bytes", "data bytes", sparse["data_bytes"], round(sent_ratio, 2),
                          "<= 1.1x data", sent_ratio <= 1.1,
                          note=f"the hub READ {s['bytes_fetched']} bytes"))
    print("resync after a hub outage (SIGKILL, writes, restart): plan, dirtied, chunk bytes, resent")
    names = ("4 KiB random writes", "1 MiB random writes")
    for label, o in zip(names, sparse["outages"]):
        print(f"  {label:<20} {o['plan']:<6} dirtied {o['dirtied'] / MiB:6.1f} MiB, touched "
              f"chunks {o['chunk_bytes'] / MiB:6.1f} MiB, agent tracked "
              f"{o['agent_tracked'] / MiB:6.1f} MiB, resent {o['resent'] / MiB:6.1f} MiB "
              f"({o['resent'] / o['dirtied']:.2f}x dirtied) in {o['seconds']:.1f} s")
        figures.append(figure(f"resync after outage, {label}", o["resent"], "bytes",
                              "bytes dirtied", o["dirtied"], round(o["resent"] / o["dirtied"], 2),
                              "<= 1.5x bytes dirtied", o["resent"] <= 1.5 * o["dirtied"],
                              note=f"plan {o['plan']}; touched chunks {o['chunk_bytes']} bytes; "
                                   f"agent tracked {o['agent_tracked']} bytes"))
    print("replica sha256 == source sha256 after the syncs and resyncs: yes")

    notes = []
    cores = (d["hub_cpu_s"] + d["agent_cpu_s"]) / d["seconds"]
    dense_ratio = figures[0]["ratio"]
    if dense_ratio < 1.0:
        hub_cores, agent_cores = d["hub_cpu_s"] / d["seconds"], d["agent_cpu_s"] / d["seconds"]
        bound = ("so the copy path is CPU-bound" if cores >= 0.75 * os.cpu_count() else
                 "so neither process saturates a core" if max(hub_cores, agent_cores) < 0.8
                 else "so one process is close to a full core")
        notes.append(
            f"Dense sync at {dense_ratio:.2f}x the faster C copy: rephub used {hub_cores:.2f} "
            f"and repagent {agent_cores:.2f} cores ({d['hub_cpu_s']:.1f} + "
            f"{d['agent_cpu_s']:.1f} CPU seconds in {d['seconds']:.1f} s on "
            f"{os.cpu_count()} cores), {bound}.  The hub writes each byte twice: "
            f"to its journal (durable before the volume is consistent) and, by the applier "
            f"running behind the sync, to the replica ({d_lag / MiB:.0f} MiB were still "
            f"unapplied at 'consistent'; all applied after {d['applied_seconds']:.1f} s), while "
            "each baseline writes it once and fdatasyncs once.  Each byte also goes through the "
            "agent's Python NBD client, two CRC-32 passes and TCP, with "
            f"{rephub.SYNC_WINDOW * rephub.SYNC_PIECE // MiB} MiB of READs in flight; "
            "nbdcopy moves it between two NBD sockets in C with no checksum.")
    if s["bytes_fetched"] > 2 * sparse["data_bytes"]:
        notes.append(
            f"The sparse sync READ {s['bytes_fetched'] / MiB:.0f} MiB for "
            f"{sparse['data_bytes'] / MiB:.0f} MiB of data: feature EXTENTS was not used "
            "(an agent or hub without it READs the whole volume in 1 MiB pieces).")
    notes.append(
        f"Sparse sync: the hub asks EXTENT_QUERY (the agent answers from QSD's NBD "
        f"base:allocation block status), sends a SYNCED for each zero extent with no "
        f"record (the new replica reads as zeroes there already; holes stay holes) and "
        f"READs only the {s['bytes_fetched'] / MiB:.0f} MiB of data, in "
        f"{CHUNK // KiB} KiB pieces.  Per data byte the sync job takes {prop_job:.2f}x the "
        f"dense job's time; from the agent's start {prop:.2f}x, because the agent's fixed "
        f"set-up (QMP, mirror job, handshake: about {s['seconds'] - s['job_seconds']:.2f} s) "
        f"weighs on a {s['seconds']:.2f} s sync.")
    small = sparse["outages"][0]
    notes.append(
        f"Resync resends what was written, in 4 KiB blocks: {small['dirtied'] / MiB:.0f} MiB of "
        f"4 KiB writes touched {small['chunk_bytes'] / MiB:.0f} MiB of {CHUNK // KiB} KiB "
        f"chunks; the agent tracked {small['agent_tracked'] / MiB:.1f} MiB (its second level, "
        f"VOLUME.bitmap.fine) and the DIRTY plan fetched {small['resent'] / MiB:.1f} MiB "
        f"({small['resent'] / small['dirtied']:.2f}x dirtied).")
    if args.json:
        print("BENCH-JSON " + json.dumps({"bench": "sync", "figures": figures, "notes": notes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

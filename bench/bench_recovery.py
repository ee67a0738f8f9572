#!/usr/bin/env python3
"""Recovery read throughput: a replica read through ``repagent.py recover`` vs read directly.

Measured in the same run, on the same replica file (page cache warm for both):

  baseline  sequential 1 MiB ``os.pread`` of the hub's replica file
  recovery  sequential 1 MiB NBD reads (``nbd.NBDClient``, one at a time) from
            the export of ``repagent.py recover --test --at latest``: each read
            is an RREAD to ``rephub.py serve`` (a subprocess) over TCP and an
            RREAD_REPLY back, answered only when the hub answers

  reference sequential 1 MiB NBD reads with the same client from ``qemu-nbd``
            serving the replica file: what the client alone costs, for context

Prints MiB/s for each, the ratio recovery/reference (qemu-nbd of the replica;
target >= 0.7x, each round's and the median) and recovery/baseline.

    python3 bench/bench_recovery.py [--size-mib N] [--rounds R] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import nbd  # noqa: E402
import repagent  # noqa: E402
from hubtools import MemVolume, TestAgent, wait_until  # noqa: E402
from procs import HubProc, end, start_recover  # noqa: E402
from qemu_harness import QemuNBD  # noqa: E402

MiB = 1024 * 1024
VOLUME = "benchvol"


def read_rate(read, size: int, passes: int, what: str) -> float:
    """MiB/s of ``passes`` sequential passes of 1 MiB ``read(offset)`` calls over ``size``."""
    t0 = time.perf_counter()
    for _ in range(passes):
        for off in range(0, size, MiB):
            if len(read(off)) != MiB:
                raise RuntimeError(f"short read of {what} at {off}")
    return passes * size / MiB / (time.perf_counter() - t0)


def read_direct(path: str, size: int, passes: int = 1) -> float:
    """MiB/s of 1 MiB preads over the file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_rate(lambda off: os.pread(fd, MiB, off), size, passes, path)
    finally:
        os.close(fd)


def read_export(sock: str, size: int, passes: int = 1, export: str = VOLUME) -> float:
    """MiB/s of 1 MiB NBD reads over the export."""
    with nbd.NBDClient(sock, export) as client:
        return read_rate(lambda off: client.read(off, MiB), size, passes,
                         f"NBD export {export} on {sock}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=128, help="volume size (all data)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="interleaved rounds of (direct, recovery, qemu-nbd); medians are "
                         "compared")
    ap.add_argument("--passes", type=int, default=4,
                    help="passes over the volume in each measurement (a round of one pass "
                         "of 128 MiB lasts some 0.1 s: too short to be steady)")
    ap.add_argument("--json", action="store_true",
                    help="also print a BENCH-JSON line for bench/report.py")
    args = ap.parse_args()
    size = args.size_mib * MiB
    work = tempfile.mkdtemp(prefix="bench_rec.", dir="/tmp")
    hub = rec = qnbd = None
    try:
        hub = HubProc(work, agent_ids=("agent1",), log_level="WARNING").start()
        vol = MemVolume(size, data=os.urandom(size))
        with TestAgent(hub.address, "agent1", hub.secret("agent1")).connect() as agent:
            agent.attach(VOLUME, vol)
            wait_until(lambda: (hub.volume(VOLUME) or {}).get("state") == "consistent", 300,
                       "the full sync")
        rec, uri = start_recover(f"127.0.0.1:{hub.port}", "agent1", hub.secret_file, VOLUME,
                                 "latest", "--test", Path(work) / "recover.log", timeout=60,
                                 log_level="WARNING")
        if not uri:
            raise RuntimeError("repagent.py recover did not print its URI")
        sock, _ = repagent.parse_nbd_uri(uri)
        replica = str(hub.replica(VOLUME))
        read_export(sock, size)  # warm both page caches alike
        qnbd = QemuNBD(replica, export_name=VOLUME).start()
        direct, remote, ref = [], [], []
        for _ in range(args.rounds):
            direct.append(read_direct(replica, size, args.passes))
            remote.append(read_export(sock, size, args.passes))
            ref.append(read_export(str(qnbd.export_path), size, args.passes))
        d, r, q = (statistics.median(x) for x in (direct, remote, ref))
        each = [x / y for x, y in zip(remote, ref)]   # recovery / qemu-nbd, each round
        rq = statistics.median(each)
        fmt = lambda xs: " ".join(f"{x:.0f}" for x in xs)  # noqa: E731
        print(f"bench_recovery: {args.size_mib} MiB volume, sequential 1 MiB reads, "
              f"{args.rounds} rounds of {args.passes} passes")
        print(f"  baseline (pread of the replica file)      {d:8.1f} MiB/s  [{fmt(direct)}]")
        print(f"  recovery export (NBD -> agent -> hub, QD1) {r:8.1f} MiB/s  [{fmt(remote)}]")
        print(f"  reference (qemu-nbd of the replica, QD1)  {q:8.1f} MiB/s  [{fmt(ref)}]")
        print(f"  ratio recovery/reference {rq:.2f}x (target >= 0.7x; rounds "
              f"{' '.join(f'{x:.2f}' for x in each)}); recovery/baseline {r / d:.2f}x")
        if args.json:
            print("BENCH-JSON " + json.dumps({"bench": "recovery", "figures": [
                {"name": "sequential 1 MiB reads through repagent.py recover (QD1)",
                 "value": round(r, 1), "unit": "MiB/s",
                 "baseline_name": "qemu-nbd of the replica (QD1)", "baseline": round(q, 1),
                 "ratio": round(rq, 2), "target": ">= 0.7x", "met": rq >= 0.7,
                 "note": f"ratio: median over {args.rounds} rounds of the ratio within each "
                         f"round ({' '.join(f'{x:.2f}' for x in each)}); page cache warm"},
                {"name": "sequential 1 MiB reads through repagent.py recover, vs pread",
                 "value": round(r, 1), "unit": "MiB/s",
                 "baseline_name": "pread of the replica file", "baseline": round(d, 1),
                 "ratio": round(r / d, 2)}]}))
        return 0
    finally:
        if qnbd is not None:
            qnbd.stop()
        end(rec, signal.SIGTERM)
        if hub is not None:
            hub.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

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

Prints MiB/s for each and the ratio recovery/baseline (target >= 0.5x).

    python3 bench/bench_recovery.py [--size-mib N] [--rounds R] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import nbd  # noqa: E402
import rephub  # noqa: E402
from hubtools import HubProcess, MemVolume, TestAgent, make_agents_file, wait_until  # noqa: E402
from qemu_harness import QemuNBD  # noqa: E402

MiB = 1024 * 1024
VOLUME = "benchvol"


def read_direct(path: str, size: int) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        for off in range(0, size, MiB):
            if len(os.pread(fd, MiB, off)) != MiB:
                raise RuntimeError(f"short read of {path} at {off}")
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def read_export(sock: str, size: int, export: str = VOLUME) -> float:
    with nbd.NBDClient(sock, export) as client:
        t0 = time.perf_counter()
        for off in range(0, size, MiB):
            if len(client.read(off, MiB)) != MiB:
                raise RuntimeError(f"short NBD read at {off}")
        return time.perf_counter() - t0


def start_recover(work: str, port: int, secret_file: str) -> tuple[subprocess.Popen, str]:
    sock = os.path.join(work, "rec.sock")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "repagent.py"), "recover", "--hub",
         f"127.0.0.1:{port}", "--agent-id", "agent1", "--secret-file", secret_file,
         "--volume", VOLUME, "--at", "latest", "--test", "--listen", f"unix:{sock}",
         "--log-level", "WARNING"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=open(os.path.join(work, "recover.log"), "ab"))
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    line, deadline = b"", time.monotonic() + 60
    while not line.endswith(b"\n"):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("repagent.py recover did not print its URI")
        if sel.select(timeout=0.2):
            line += os.read(proc.stdout.fileno(), 256)
    sel.close()
    return proc, sock


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=128, help="volume size (all data)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds of (direct, recovery); medians are compared")
    ap.add_argument("--json", action="store_true",
                    help="also print a BENCH-JSON line for bench/report.py")
    args = ap.parse_args()
    size = args.size_mib * MiB
    work = tempfile.mkdtemp(prefix="bench_rec.", dir="/tmp")
    hub = rec = qnbd = None
    try:
        secrets = make_agents_file(os.path.join(work, "agents"), "agent1")
        secret_file = os.path.join(work, "secret")
        with open(os.open(secret_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(secrets["agent1"].hex() + "\n")
        data_dir = os.path.join(work, "hub")
        hub = HubProcess(data_dir, os.path.join(work, "agents"), "--log-level", "WARNING",
                         log_path=os.path.join(work, "hub.log")).start()
        vol = MemVolume(size, data=os.urandom(size))
        with TestAgent(hub.address, "agent1", secrets["agent1"]).connect() as agent:
            agent.attach(VOLUME, vol)

            def consistent():
                st = rephub.control_request(data_dir, {"cmd": "status"})
                return any(v["name"] == VOLUME and v["state"] == "consistent"
                           for v in st["volumes"])
            wait_until(consistent, 300, "the full sync")
        rec, sock = start_recover(work, hub.address[1], secret_file)
        replica = os.path.join(data_dir, "volumes", VOLUME, "replica")
        read_export(sock, size)  # warm both page caches alike
        qnbd = QemuNBD(replica, export_name=VOLUME).start()
        direct, remote, ref = [], [], []
        for _ in range(args.rounds):
            direct.append(size / MiB / read_direct(replica, size))
            remote.append(size / MiB / read_export(sock, size))
            ref.append(size / MiB / read_export(str(qnbd.export_path), size))
        d, r, q = (statistics.median(x) for x in (direct, remote, ref))
        fmt = lambda xs: " ".join(f"{x:.0f}" for x in xs)  # noqa: E731
        print(f"bench_recovery: {args.size_mib} MiB volume, sequential 1 MiB reads, "
              f"{args.rounds} rounds")
        print(f"  baseline (pread of the replica file)      {d:8.1f} MiB/s  [{fmt(direct)}]")
        print(f"  recovery export (NBD -> agent -> hub, QD1) {r:8.1f} MiB/s  [{fmt(remote)}]")
        print(f"  reference (qemu-nbd of the replica, QD1)  {q:8.1f} MiB/s  [{fmt(ref)}]")
        print(f"  ratio recovery/baseline {r / d:.2f}x (target >= 0.5x); "
              f"recovery/reference {r / q:.2f}x")
        if args.json:
            print("BENCH-JSON " + json.dumps({"bench": "recovery", "figures": [
                {"name": "sequential 1 MiB reads through repagent.py recover (QD1)",
                 "value": round(r, 1), "unit": "MiB/s",
                 "baseline_name": "pread of the replica file", "baseline": round(d, 1),
                 "ratio": round(r / d, 2), "target": ">= 0.5x", "met": r / d >= 0.5,
                 "note": f"median of {args.rounds} rounds, page cache warm"}]}))
        return 0
    finally:
        if qnbd is not None:
            qnbd.stop()
        if rec is not None and rec.poll() is None:
            rec.send_signal(signal.SIGTERM)
            try:
                rec.wait(30)
            except subprocess.TimeoutExpired:
                rec.kill()
                rec.wait(10)
        if hub is not None:
            hub.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""The long fault run: ``make soak ROUNDS=100`` (``python3 tests/faults/soak.py``).

Runs the rounds of tests/faults/test_faults.py for as long as asked: a
cluster (QSD + repagent + rephub, FaultProxy in the link, QD1 writer), and per
round some writes, one random fault under writes (tests/faults/cluster.py
``Fault``), more writes, then: converge (deadline), replica sha256 == source
sha256 == the oracle of acknowledged writes, a checkpoint.  In sync mode a
hub kill also checks that every write QEMU acknowledged is in the replica.
At the end every checkpoint still in the journal window is exported and
compared with the oracle's sha256 at that point.  The rounds are split
between the modes given (default async then sync).

Prints a table (rounds, faults by kind, converged, bytes resent, max
convergence time) and exits 1 if any round failed.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE.parent)]

from faults.cluster import CHUNK, LINK_AND_PROCESS_FAULTS, Cluster, Fault  # noqa: E402
from oracle import rebase  # noqa: E402
from qemu_harness import MiB, wait_until  # noqa: E402


def soak(mode: str, rounds: int, seed: int, size: int, workdir: Path, out,
         disk_full_mib: int = 0) -> dict:
    """``disk_full_mib``: the hub's data on a tmpfs that big, and DISK_FULL among the
    faults (the journal then keeps 20 s in 16 MiB segments, so that the rounds
    themselves do not fill it)."""
    rng = random.Random(seed)
    faults = list(Fault) if disk_full_mib else LINK_AND_PROCESS_FAULTS
    stats = dict(mode=mode, rounds=0, bytes_up=0, failed=0, faults={}, converged=0, resent=0,
                 written=0, max_converge=0.0, worst_resent=0, checkpoints=0,
                 checkpoints_ok=0, acked_checks=0, errors=[])
    expected: dict[str, str] = {}
    started = time.monotonic()
    with Cluster(workdir, size=size, mode=mode, seed=seed, writer_gap=0.01,
                 max_write=64 * 1024, hub_fs_size=disk_full_mib * MiB or None,
                 hub_args=["--journal-retention", "20", "--journal-segment-bytes",
                           str(16 * MiB)] if disk_full_mib else ()) as cl:
        cl.converge(180)
        cl.writer.start()
        for i in range(rounds):
            fault = rng.choice(faults)
            hold = rng.uniform(0.3, 2.5)
            stats["rounds"] += 1
            stats["faults"][fault.value] = stats["faults"].get(fault.value, 0) + 1
            try:
                cl.writer.resume()
                n = cl.writer.count
                wait_until(lambda: cl.writer.count > n + 3 or cl.writer.error, 60, "writes")
                time.sleep(rng.uniform(0.3, 2.0))      # workload time before the fault
                up, written, writes = cl.proxy.bytes_up, cl.writer.bytes, cl.writer.count
                resync_before, agent_proc = cl.resync_counter(), cl.agent.proc
                cl.inject(fault, hold)
                time.sleep(rng.uniform(0.2, 1.5))
                cl.writer.pause()
                took = cl.converge(180)
                cl.check_identical()
                # Bytes resent: what the hub pulled again (READ_REPLY data).  Only
                # chunks this round's writes dirtied may be resent, never a full copy.
                resent = cl.resync_counter() - (0 if cl.agent.proc is not agent_proc
                                                 else resync_before)
                dirtied = (cl.writer.bytes - written) + 2 * CHUNK * (cl.writer.count - writes)
                stats["bytes_up"] += cl.proxy.bytes_up - up
                stats["converged"] += 1
                stats["resent"] += resent
                stats["written"] += cl.writer.bytes - written
                stats["worst_resent"] = max(stats["worst_resent"], resent)
                stats["max_converge"] = max(stats["max_converge"], took)
                if resent > min(size, dirtied):
                    raise AssertionError(f"round {i} ({fault.value}) re-sent {resent} bytes, "
                                         f"more than the {min(size, dirtied)} bytes its writes "
                                         "can have dirtied")
                name = f"soak-{i}"
                cl.checkpoint(name)
                expected[name] = cl.model.sha256_at(name)
                if disk_full_mib:   # a 20 s window: each checkpoint is checked at once
                    check_exports(cl, {name: expected.pop(name)}, workdir, stats)
                rebase(cl.model)
                print(f"{mode} round {i + 1}/{rounds}: {fault.value:13s} hold {hold:.1f}s "
                      f"converged in {took:5.1f}s, resent {resent / MiB:6.2f} MiB", file=out,
                      flush=True)
            except Exception as err:  # noqa: BLE001 - counted and reported, run stops
                stats["failed"] += 1
                stats["errors"].append(f"round {i} {fault.value}: {err}")
                traceback.print_exc(file=out)
                break
        cl.writer.stop()
        stats["acked_checks"] = cl.acked_checks
        # Replica-state oracle over the whole run: every checkpoint's export.
        check_exports(cl, expected, workdir, stats)
        log = cl.hub.log.read_text(errors="replace") + cl.agent.log.read_text(errors="replace")
        stats["tracebacks"] = log.count("Traceback")
    stats["seconds"] = time.monotonic() - started
    return stats


def check_exports(cl: Cluster, expected: dict[str, str], workdir: Path, stats: dict) -> None:
    """Export each checkpoint and compare it with the oracle's sha256 there."""
    for name, sha in expected.items():
        stats["checkpoints"] += 1
        try:
            got = cl.export(name, workdir / "export.raw")
        except Exception as err:  # noqa: BLE001 - e.g. outside the window
            stats["errors"].append(f"export {name}: {err}")
            continue
        if hashlib.sha256(got).hexdigest() == sha:
            stats["checkpoints_ok"] += 1
        else:
            stats["errors"].append(f"checkpoint {name}: export differs from the oracle")


def measure_verify(size: int, workdir: Path, out) -> dict:
    """Online verify of an identical volume of ``size`` bytes full of data: how many
    bytes cross the agent-hub link (both ways, FaultProxy counters) against its size."""
    image = workdir / "qsd" / "disk0.raw"
    image.parent.mkdir(parents=True)
    rng = random.Random(size)
    with open(image, "wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(rng.randbytes(4 * MiB))
    with Cluster(workdir, size=size, mode="async") as cl:
        start = time.monotonic()
        cl.converge(1800)
        full_sync = time.monotonic() - start
        up, down = cl.proxy.bytes_up, cl.proxy.bytes_down
        start = time.monotonic()
        res = cl.hub.request({"cmd": "verify", "volume": cl.volume}, timeout=30)
        took = time.monotonic() - start
        shipped = cl.proxy.bytes_up - up + cl.proxy.bytes_down - down
    result = dict(size=size, shipped=shipped, ratio=shipped / size, seconds=took,
                  full_sync_seconds=full_sync, differing=len(res["differing"]))
    print(f"verify of an identical {size / MiB:.0f} MiB volume: {shipped} bytes over the link "
          f"({100 * shipped / size:.3f} % of its size), {took:.1f} s; "
          f"{len(res['differing'])} differing ranges (first FULL sync took {full_sync:.1f} s)",
          file=out, flush=True)
    return result


def table(all_stats: list[dict]) -> str:
    kinds = [f.value for f in Fault]
    lines = ["| mode | rounds | " + " | ".join(kinds) + " | converged | checkpoints = oracle "
             "| sync ACK checks | bytes written | bytes sent to hub | bytes resent "
             "| worst round resent "
             "| max convergence | tracebacks | time |",
             "|---" * (len(kinds) + 12) + "|"]
    for s in all_stats:
        lines.append(
            f"| {s['mode']} | {s['rounds']} | "
            + " | ".join(str(s["faults"].get(k, 0)) for k in kinds)
            + f" | {s['converged']}/{s['rounds']} | {s['checkpoints_ok']}/{s['checkpoints']} "
            f"| {s['acked_checks']} | {s['written'] / MiB:.1f} MiB | {s['bytes_up'] / MiB:.1f} MiB "
            f"| {s['resent'] / MiB:.1f} MiB "
            f"| {s['worst_resent'] / MiB:.2f} MiB | {s['max_converge']:.1f} s "
            f"| {s['tracebacks']} | {s['seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--modes", default="async,sync")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--size-mib", type=int, default=32)
    ap.add_argument("--disk-full-mib", type=int, default=0, metavar="MIB",
                    help="put the hub's data on a tmpfs of MIB and add the disk-full fault")
    ap.add_argument("--verify-mib", type=int, default=0,
                    help="instead of rounds: measure an online verify of a volume this big")
    args = ap.parse_args(argv)
    if args.verify_mib:
        workdir = Path(tempfile.mkdtemp(prefix="soak-verify-"))
        try:
            res = measure_verify(args.verify_mib * MiB, workdir, sys.stdout)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        ok = res["ratio"] < 0.01 and res["differing"] == 0
        print("verify measurement", "passed" if ok else "FAILED (>= 1 % or differences)")
        return 0 if ok else 1
    modes = [m for m in args.modes.split(",") if m]
    per_mode = [args.rounds // len(modes) + (i < args.rounds % len(modes))
                for i in range(len(modes))]
    results = []
    for i, (mode, rounds) in enumerate(zip(modes, per_mode)):
        workdir = Path(tempfile.mkdtemp(prefix=f"soak-{mode}-"))
        try:
            results.append(soak(mode, rounds, args.seed + i, args.size_mib * MiB, workdir,
                                sys.stdout, args.disk_full_mib))
        finally:
            if results and not results[-1]["failed"] and not results[-1]["errors"]:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                print(f"logs kept in {workdir}")
    print()
    print(table(results))
    bad = [e for s in results for e in s["errors"]] + \
          [f"{s['mode']}: {s['tracebacks']} tracebacks in the logs" for s in results
           if s["tracebacks"]]
    for e in bad:
        print("FAILED:", e)
    print("soak", "FAILED" if bad else "passed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

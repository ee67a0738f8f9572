#!/usr/bin/env python3
"""What protection costs a real Linux guest: dd inside a VM whose disk is served by
qemu-storage-daemon, unprotected and protected by repagent -> rephub, in one run.

    python3 bench/bench_guest.py [--rounds 3] [--dd-mib 64] [--dsync-writes 300]
                                 [--transport vhost-user-blk|nbd] [--accel auto|kvm|tcg]

The guest is Debian's own kernel (linux-image-amd64: /boot/vmlinuz-*, with
virtio_pci and virtio_blk and their dependencies from /lib/modules when they
are modules) and an initramfs this script builds in a temp dir (cpio newc,
written here): busybox (busybox-static) for the shell, and the host's GNU dd
(coreutils, with the shared libraries ``ldd`` names) because busybox's dd has
no ``oflag=dsync``.  qemu-system-x86_64 runs it with KVM when /dev/kvm opens
and a first guest boots with it (nested KVM can open and still hang), else
TCG; one vCPU, the console on a serial port written to a file.

Its one data disk, /dev/vda, is an export of a fresh qemu-storage-daemon (QSD)
owning a raw image: a vhost-user-blk export (the guest's device is
vhost-user-blk-pci) or, with ``--transport nbd``, QSD's NBD export (the
guest's device is virtio-blk-pci over QEMU's NBD client).  The guest's
/init runs, timed by GNU dd itself:

1. ``dd if=/dev/zero of=/dev/vda bs=1M count=DD_MIB oflag=direct``;
2. ``dd if=/tmp/rand of=/dev/vda bs=4k count=DSYNC_WRITES oflag=dsync``
   (random data made beforehand in a tmpfs; each write is a write and a
   flush, so QSD fdatasyncs its image each time),

prints the results between ``BENCH-GUEST`` markers on its console and powers
off.  Four configurations, each round in this order, each with a fresh QSD:

unprotected  QSD alone;
mirror       QSD's write-blocking active mirror into ``qemu-nbd`` serving a
             raw file: what the mirror alone costs, with a target that does
             nothing but write (no replication), for context;
async        QSD's write-blocking active mirror into repagent's NBD server,
             repagent ``--mode async`` streaming to rephub on 127.0.0.1;
sync         the same with ``--mode sync`` (a write completes once durable at
             the hub).

The set-up of the protected ones is bench_profile's ``Setup`` (the agent and
the hub unchanged, no probes), the guest boots once the initial sync is
done.  After each protected boot the agent's queue is drained, the hub has
applied its journal, and the replica must equal the image (sha256), so a
fast but wrong replication cannot pass.

Printed per round and as the median of the rounds' ratios: how many times
slower the protected configurations are than unprotected (time of the same
dd; for the 4 KiB writes, the mean time per write).  Issue targets: dd 1 MiB
async <= 1.5x, sync <= 2x; 4 KiB dsync sync <= 1.5x.  Then the same against
``mirror``: the part of the slowdown that is repagent's and rephub's, not
the mirror's.  With a tool, the kernel
or busybox missing it prints ``skipped: <what>`` and exits 0.  A guest that
does not finish within ``--guest-timeout`` is killed; every process started
is stopped and the temp dirs removed, also on SIGINT/SIGTERM.  With
``--json`` a last line ``BENCH-JSON {...}`` carries the figures for
bench/report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import repagent  # noqa: E402
import rephub  # noqa: E402
from bench_profile import Setup, loadavg  # noqa: E402
from qemu_harness import QSD, MiB, file_sha256, kill_all, short_tmpdir, wait_until  # noqa: E402

KiB = 1024
MARK = "BENCH-GUEST"
CONFIGS = ("unprotected", "mirror", "async", "sync")
#: The issue's targets: protected time / unprotected time, at most.
TARGETS = {("dd1m", "async"): 1.5, ("dd1m", "sync"): 2.0, ("dsync4k", "sync"): 1.5}
GUEST_MEMORY_MIB = 256      # busybox, GNU dd, the modules and a tmpfs of random data
VOLUME_SLACK = 16 * MiB     # the volume is the dd region plus this
DRAIN_TIMEOUT = 120.0       # for the agent's queue and the hub's journal after a boot
TOOLS = ("qemu-system-x86_64", "qemu-storage-daemon", "qemu-img")
#: The guest's modules (with what they need, from modules.dep), unless built in.
MODULES = ("virtio_pci", "virtio_blk")


# ---------------------------------------------------------------------------
# What the guest is made of

@dataclass
class GuestParts:
    """The host files a guest is built from."""
    kernel: Path
    release: str
    modules: list[Path] = field(default_factory=list)      # in load order
    busybox: Path = Path("/bin/busybox")
    dd: Path = Path("/bin/dd")
    libs: list[Path] = field(default_factory=list)         # what busybox and dd link


class Missing(Exception):
    """Something the guest needs is not on this machine (the bench is skipped)."""


def find_kernel() -> tuple[Path, str]:
    """The newest readable /boot/vmlinuz-RELEASE that has /lib/modules/RELEASE."""
    found = []
    for path in Path("/boot").glob("vmlinuz-*"):
        release = path.name.removeprefix("vmlinuz-")
        if os.access(path, os.R_OK) and (Path("/lib/modules") / release).is_dir():
            found.append((re.sub(r"\d+", lambda m: m.group().zfill(8), release), path, release))
    if not found:
        raise Missing("a kernel (/boot/vmlinuz-* with /lib/modules; package linux-image-amd64)")
    _, path, release = max(found)
    return path, release


def module_chain(release: str, names: tuple[str, ...]) -> list[Path]:
    """The .ko files for ``names`` and what they depend on, dependencies first;
    a module built into the kernel (modules.builtin) needs none."""
    base = Path("/lib/modules") / release
    deps: dict[str, list[str]] = {}
    for line in (base / "modules.dep").read_text(encoding="utf-8").splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
    by_name = {Path(m).name.split(".ko")[0].replace("-", "_"): m for m in deps}
    builtin_file = base / "modules.builtin"
    builtin = {Path(m).name.split(".ko")[0].replace("-", "_")
               for m in builtin_file.read_text(encoding="utf-8").split()} \
        if builtin_file.exists() else set()
    order: list[str] = []

    def add(mod: str) -> None:
        if mod in order:
            return
        for dep in deps.get(mod, []):
            add(dep)
        order.append(mod)
    for name in names:
        if name in builtin:
            continue
        if name not in by_name:
            raise Missing(f"the {name} module (not in {base / 'modules.dep'} nor built in)")
        add(by_name[name])
    for mod in order:
        if not mod.endswith(".ko"):
            raise Missing(f"an uncompressed {mod} (busybox insmod loads plain .ko files)")
    return [base / mod for mod in order]


def shared_libs(binary: Path) -> list[Path]:
    """The shared libraries (and the loader) ``ldd`` names for ``binary``; none
    for a static one."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:             # "not a dynamic executable"
        return []
    return [Path(tok) for line in out.stdout.splitlines() for tok in line.split()
            if tok.startswith("/")]


def find_parts() -> GuestParts:
    """Everything the guest needs, or Missing naming the first thing that is not here."""
    for tool in TOOLS:
        if shutil.which(tool) is None:
            raise Missing(f"{tool} (packages qemu-system-x86, qemu-system-common, qemu-utils)")
    kernel, release = find_kernel()
    busybox = shutil.which("busybox")
    if busybox is None:
        raise Missing("busybox (package busybox-static)")
    dd = shutil.which("dd")
    version = subprocess.run([dd, "--version"], capture_output=True, text=True,
                             timeout=30).stdout if dd else ""
    if "coreutils" not in version:
        raise Missing("GNU dd (coreutils; busybox's dd has no oflag=dsync)")
    libs = sorted({lib for b in (busybox, dd) for lib in shared_libs(Path(b))})
    return GuestParts(kernel, release, module_chain(release, MODULES), Path(busybox),
                      Path(dd), libs)


# ---------------------------------------------------------------------------
# The initramfs: cpio "newc" (the kernel's initramfs format, Documentation/
# driver-api/early-userspace/buffer-format.rst)

NEWC_MAGIC = b"070701"
#: After the magic, 13 fields of 8 ASCII hex digits: ino, mode, uid, gid, nlink,
#: mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize (with
#: the NUL), check (0).  Name and data are each padded to 4 bytes.
S_IFDIR, S_IFREG, S_IFCHR, S_IFLNK = 0o040000, 0o100000, 0o020000, 0o120000


class Cpio:
    """A newc archive written entry by entry (parents before children)."""

    def __init__(self, f):
        self.f = f
        self.ino = 0
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        self.ino += 1
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0)
        header = NEWC_MAGIC + b"".join(b"%08X" % v for v in fields)
        self.f.write(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self.f.write(data + b"\0" * (-len(data) % 4))

    def mkdir(self, name: str) -> None:
        """``name`` and its missing parents."""
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            if path not in self.dirs:
                self.dirs.add(path)
                self._entry(path, S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        name = name.strip("/")
        if "/" in name:
            self.mkdir(name.rsplit("/", 1)[0])
        self._entry(name, S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name.strip("/"), S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name.strip("/"), S_IFCHR | 0o600, rdev=(major, minor))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0, nlink=1)


GUEST_DD = "/opt/bench/dd"

#: The guest's /init (busybox sh).  Every wait is bounded; it powers off at the end.
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin LD_LIBRARY_PATH={libdirs} LC_ALL=C
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
finish() {{ echo "{mark} done"; sync; poweroff -f; sleep 10; }}
echo "{mark} boot $(cut -d' ' -f1 /proc/uptime) s"
for m in {modules}; do
    insmod "/lib/modules/$m" || echo "{mark} error insmod $m"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -b /dev/vda ]; then echo "{mark} error no /dev/vda"; finish; fi
echo "{mark} disk $(cat /sys/block/vda/size) sectors, cache $(cat /sys/block/vda/queue/write_cache)"
{dd} if=/dev/urandom of=/tmp/rand bs=4k count={dsync} 2>/dev/null
echo "{mark} begin dd1m"
{dd} if=/dev/zero of=/dev/vda bs=1M count={dd_mib} oflag=direct
echo "{mark} end dd1m $?"
echo "{mark} begin dsync4k"
{dd} if=/tmp/rand of=/dev/vda bs=4k count={dsync} oflag=dsync
echo "{mark} end dsync4k $?"
finish
"""

#: The guest's /probe: does it boot at all (with KVM)?
PROBE = f"""#!/bin/busybox sh
/bin/busybox echo "{MARK} probe"
/bin/busybox poweroff -f
"""


def build_initramfs(path: Path, parts: GuestParts, dd_mib: int, dsync: int) -> None:
    """Write the guest's initramfs (uncompressed newc) to ``path``."""
    libdirs = sorted({str(lib.parent) for lib in parts.libs}) or ["/lib"]
    init = INIT.format(mark=MARK, libdirs=":".join(libdirs), dd=GUEST_DD, dd_mib=dd_mib,
                       dsync=dsync, modules=" ".join(m.name for m in parts.modules))
    with open(path, "wb") as f:
        cpio = Cpio(f)
        for d in ("bin", "dev", "proc", "sys", "tmp", "lib/modules"):
            cpio.mkdir(d)
        cpio.chardev("dev/console", 5, 1)    # init's stdio before devtmpfs is mounted
        cpio.file("init", init.encode())
        cpio.file("probe", PROBE.encode())
        cpio.file("bin/busybox", parts.busybox.read_bytes())
        cpio.symlink("bin/sh", "busybox")
        cpio.file(GUEST_DD, parts.dd.read_bytes())
        for lib in parts.libs:               # at the paths ldd named (the loader's too)
            cpio.file(str(lib), lib.read_bytes())
        for mod in parts.modules:
            cpio.file(f"lib/modules/{mod.name}", mod.read_bytes(), 0o644)
        cpio.close()


# ---------------------------------------------------------------------------
# The guest

PROBE_TIMEOUT = 45.0        # a KVM guest reaches its /probe in a few seconds


def choose_accel(accel: str, parts: GuestParts, initrd: Path, work: Path) -> tuple[bool, str]:
    """(KVM?, why).  For "auto": KVM if /dev/kvm opens read-write and a guest
    boots with it to its /probe within PROBE_TIMEOUT (nested KVM may open and
    still hang or abort), else TCG."""
    if accel != "auto":
        return accel == "kvm", f"--accel {accel}"
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError as err:
        return False, f"TCG: /dev/kvm: {err.strerror}"
    console = work / "probe.log"
    argv = guest_argv(parts, initrd, console, True, None, None, None, init="/probe")
    try:
        text, seconds = boot(argv, console, PROBE_TIMEOUT)
    except (RuntimeError, TimeoutError) as err:
        return False, f"TCG: a KVM guest did not boot ({str(err).splitlines()[0][:160]})"
    if f"{MARK} probe" not in text:
        return False, "TCG: a KVM guest did not reach its /probe"
    return True, f"KVM: a guest booted in {seconds:.1f} s"


def export_args(transport: str, sock: Path) -> list[str]:
    """QSD's extra export for the guest (the NBD transport uses QSD's own export).

    On QSD's command line, so the export is a parent of the image's node
    before the mirror starts: the mirror's filter then sits under it."""
    if transport == "nbd":
        return []
    return ["--export", f"type=vhost-user-blk,id=vub0,node-name=disk0,writable=on,"
                        f"addr.type=unix,addr.path={sock}"]


def guest_argv(parts: GuestParts, initrd: Path, console: Path, kvm: bool,
               transport: str | None, disk: Path | None, export_name: str | None,
               init: str = "/init") -> list[str]:
    """The guest's command line; with ``transport`` None, no disk."""
    mem = f"{GUEST_MEMORY_MIB}M"
    argv = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
            "-no-reboot", "-monitor", "none", "-serial", f"file:{console}",
            "-smp", "1", "-m", mem,
            "-kernel", str(parts.kernel), "-initrd", str(initrd),
            "-append", f"console=ttyS0 quiet panic=-1 rdinit={init}"]
    argv += ["-accel", "kvm", "-cpu", "host"] if kvm else ["-accel", "tcg"]
    if transport == "vhost-user-blk":
        # vhost-user: QSD reads and writes the guest's memory, which must be shared.
        argv += ["-object", f"memory-backend-memfd,id=mem0,size={mem},share=on",
                 "-machine", "memory-backend=mem0",
                 "-chardev", f"socket,id=vub0,path={disk}",
                 "-device", "vhost-user-blk-pci,chardev=vub0,num-queues=1"]
    elif transport == "nbd":
        argv += ["-blockdev", f"driver=nbd,node-name=vd0,server.type=unix,"
                              f"server.path={disk},export={export_name}",
                 "-device", "virtio-blk-pci,drive=vd0"]
    return argv


def boot(argv: list[str], console: Path, timeout: float) -> tuple[str, float]:
    """Run the guest to its power-off (killed after ``timeout`` s); its console
    and the wall time."""
    log = console.with_suffix(".qemu.log")
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"the guest did not finish within {timeout:.0f} s; its console: "
                           f"{tail(console)}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    seconds = time.monotonic() - t0
    text = console.read_text(errors="replace") if console.exists() else ""
    if proc.returncode != 0:
        raise RuntimeError(f"qemu-system-x86_64 exited {proc.returncode}: {tail(log)}")
    return text.replace("\r", ""), seconds


def tail(path: Path, n: int = 1500) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(none)"


DD_LINE = re.compile(r"^(\d+) bytes .*copied, ([0-9.]+) s", re.M)


def parse_console(text: str) -> dict:
    """The guest's results: bytes and seconds of each dd, from its own summary line."""
    errors = re.findall(rf"^{MARK} error (.*)$", text, re.M)
    if errors:
        raise RuntimeError(f"the guest reported: {'; '.join(errors)}")
    out = {}
    for test in ("dd1m", "dsync4k"):
        m = re.search(rf"^{MARK} begin {test}$(.*?)^{MARK} end {test} (\d+)$", text, re.M | re.S)
        if m is None:
            raise RuntimeError(f"no {test} result on the guest's console: {text[-1500:]}")
        if m.group(2) != "0":
            raise RuntimeError(f"the guest's {test} dd exited {m.group(2)}: {m.group(1)}")
        line = DD_LINE.search(m.group(1))
        if line is None:
            raise RuntimeError(f"no dd summary line in the guest's {test}: {m.group(1)}")
        out[test] = {"bytes": int(line.group(1)), "seconds": float(line.group(2))}
    boot_s = re.search(rf"^{MARK} boot ([0-9.]+) s$", text, re.M)
    out["guest_boot_s"] = float(boot_s.group(1)) if boot_s else None
    disk = re.search(rf"^{MARK} disk (.*)$", text, re.M)
    out["disk"] = disk.group(1) if disk else "unknown"
    return out


# ---------------------------------------------------------------------------
# One configuration: a fresh QSD (and agent + hub), one boot

def run_config(config: str, work: Path, args, parts: GuestParts, initrd: Path,
               kvm: bool) -> dict:
    """Boot the guest on a fresh ``config`` set-up; its figures."""
    size = args.dd_mib * MiB + VOLUME_SLACK
    vub = short_tmpdir("bg") / "vub.sock"
    console = work / "console.log"
    setup = None if config == "unprotected" else Setup(
        work, size, "qemu-nbd" if config == "mirror" else f"repagent {config}")
    qsd = QSD(work / "qsd", size=size) if setup is None else setup.qsd
    qsd.extra_args += export_args(args.transport, vub)
    try:
        if setup is None:
            work.mkdir(parents=True)
            qsd.start()
        else:
            setup.__enter__()
        if args.transport == "vhost-user-blk":
            wait_until(vub.exists, 10, f"QSD's vhost-user-blk socket {vub}", 0.05)
        disk = vub if args.transport == "vhost-user-blk" else qsd.export_path
        argv = guest_argv(parts, initrd, console, kvm, args.transport, disk, qsd.export_name)
        text, wall = boot(argv, console, args.guest_timeout)
        result = parse_console(text)
        result["wall_s"] = wall
        if setup is not None and setup.hub is not None:
            check_replica(setup)
        return result
    finally:
        if setup is None:
            qsd.kill()
            qsd.close()
        else:
            setup.close()
        shutil.rmtree(vub.parent, ignore_errors=True)


def check_replica(setup: Setup) -> None:
    """Wait until the agent sent everything and the hub applied it; the replica
    must then equal the image the guest wrote."""
    def drained():
        try:
            vol = repagent.query_status(str(setup.state))["volumes"][0]
        except (OSError, ValueError, KeyError, IndexError):
            return False
        return vol["dirty_bytes"] == 0 and vol["inflight_chunks"] == 0 \
            and vol["queue_frames"] == 0
    wait_until(drained, DRAIN_TIMEOUT, "the agent to send every write to the hub", 0.05)

    def applied():
        try:
            st = rephub.control_request(str(setup.work / "hub"), {"cmd": "status"})
        except (OSError, ValueError, KeyError):
            return False
        return bool(st["volumes"]) and all(v["lag_bytes"] == 0 for v in st["volumes"])
    wait_until(applied, DRAIN_TIMEOUT, "the hub to apply its journal", 0.05)
    replica = setup.work / "hub" / "volumes" / "bench" / "replica"
    if file_sha256(replica) != file_sha256(setup.qsd.image):
        raise RuntimeError(f"the hub's replica {replica} differs from the guest's image")


# ---------------------------------------------------------------------------
# The figures

def slowdowns(run: dict, base: str = "unprotected") -> dict:
    """Time / the time of configuration ``base``, per test and configuration after it."""
    return {(test, cfg): run[cfg][test]["seconds"] / run[base][test]["seconds"]
            for test in ("dd1m", "dsync4k") for cfg in CONFIGS[CONFIGS.index(base) + 1:]}


def mib_s(r: dict) -> float:
    return r["bytes"] / MiB / r["seconds"]


def per_write_us(r: dict) -> float:
    return r["seconds"] / (r["bytes"] / (4 * KiB)) * 1e6


def report(args, rounds: list[dict], kvm: bool, parts: GuestParts) -> list[dict]:
    """Print every round and the medians; return the figures for report.py."""
    n = len(rounds)
    print(f"\nguest: {parts.kernel.name}, {'KVM' if kvm else 'TCG'}, 1 vCPU, "
          f"{GUEST_MEMORY_MIB} MiB; /dev/vda over {args.transport}: "
          f"{rounds[0]['unprotected']['disk']}; {n} round(s)")
    print(f"{'round':<6} {'config':<12} {'dd 1M MiB/s':>12} {'4K dsync us/write':>18} "
          f"{'writes/s':>9} {'boot s':>7} {'wall s':>7}")
    for i, run in enumerate(rounds, 1):
        for cfg in CONFIGS:
            r = run[cfg]
            us = per_write_us(r["dsync4k"])
            print(f"{i:<6} {cfg:<12} {mib_s(r['dd1m']):>12.1f} {us:>18.0f} {1e6 / us:>9.0f} "
                  f"{r['guest_boot_s'] or 0:>7.1f} {r['wall_s']:>7.1f}")
    figures = []
    for base in ("unprotected", "mirror"):
        ratios = [slowdowns(run, base) for run in rounds]
        print(f"\n{'the mirror and protected' if base == 'unprotected' else 'protected'} / "
              f"{base} (x slower: time of the same dd), each round and median:")
        for test in ("dd1m", "dsync4k"):
            for cfg in CONFIGS[CONFIGS.index(base) + 1:]:
                each = [r[(test, cfg)] for r in ratios]
                med = statistics.median(each)
                target = TARGETS.get((test, cfg)) if base == "unprotected" else None
                verdict = "" if target is None else \
                    f"  target <= {target}x: {'met' if med <= target else 'NOT met'}"
                label = {"dd1m": f"dd 1M oflag=direct {args.dd_mib} MiB",
                         "dsync4k": f"4 KiB oflag=dsync x{args.dsync_writes}"}[test]
                print(f"  {label:<28} {cfg:<6} " + " ".join(f"{x:.2f}x" for x in each)
                      + f"  median {med:.2f}x{verdict}")
                figures.append(figure(test, cfg, base, rounds, med, each, target, args, kvm))
    return figures


def figure(test: str, cfg: str, base_cfg: str, rounds: list[dict], ratio: float,
           each: list[float], target: float | None, args, kvm: bool) -> dict:
    """One row of docs/BENCHMARKS.md: the time of ``cfg`` (median of the rounds)
    against that of ``base_cfg``, the ratio the median of the rounds' ratios."""
    def value(r: dict) -> float:
        return r["seconds"] * 1e3 if test == "dd1m" else per_write_us(r)
    prot = statistics.median(value(run[cfg][test]) for run in rounds)
    base = statistics.median(value(run[base_cfg][test]) for run in rounds)
    rates = " / ".join(f"{statistics.median(mib_s(run[c][test]) for run in rounds):.1f}"
                       for c in (base_cfg, cfg))
    what = {"mirror": "QSD's mirror into qemu-nbd"}.get(cfg, f"protected {cfg}")
    name = (f"guest dd bs=1M count={args.dd_mib} oflag=direct, time, {what}"
            if test == "dd1m" else
            f"guest dd bs=4k count={args.dsync_writes} oflag=dsync, time per write, {what}")
    if base_cfg != "unprotected":
        name += f", vs {base_cfg}"
    fig = {"name": name, "value": round(prot), "unit": "ms" if test == "dd1m" else "us",
           "baseline_name": {"mirror": "mirror into qemu-nbd"}.get(base_cfg, base_cfg),
           "baseline": round(base), "ratio": round(ratio, 2),
           "note": f"{'KVM' if kvm else 'TCG'} guest, disk over {args.transport}; {base_cfg} / "
                   f"{cfg} {rates} MiB/s; ratio: median of {len(rounds)} round(s)' ratios "
                   + " ".join(f"{x:.2f}" for x in each)}
    if target is not None:
        fig.update(target=f"<= {target}x", met=ratio <= target)
    return fig


# ---------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of (unprotected, mirror, async, sync); medians of each "
                         "round's ratio")
    ap.add_argument("--dd-mib", type=int, default=64, help="MiB the 1 MiB direct dd writes")
    ap.add_argument("--dsync-writes", type=int, default=300, help="4 KiB oflag=dsync writes")
    ap.add_argument("--transport", choices=("vhost-user-blk", "nbd"), default="vhost-user-blk",
                    help="how the guest reaches QSD's export")
    ap.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                    help="auto: KVM if /dev/kvm opens, else TCG")
    ap.add_argument("--guest-timeout", type=float, default=300.0,
                    help="seconds one guest may run before it is killed")
    ap.add_argument("--json", action="store_true",
                    help="also print a BENCH-JSON line for bench/report.py")
    args = ap.parse_args()
    for name in ("rounds", "dd_mib", "dsync_writes"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: expected at least 1")
    try:
        parts = find_parts()
    except Missing as err:
        print(f"skipped: {err}")
        return 0
    # SIGTERM (timeout(1), a stopped report.py) runs the finally blocks too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    work = short_tmpdir("bench-guest")
    rounds = []
    try:
        initrd = work / "initramfs.cpio"
        build_initramfs(initrd, parts, args.dd_mib, args.dsync_writes)
        kvm, why = choose_accel(args.accel, parts, initrd, work)
        print(f"bench_guest: {parts.kernel} with {', '.join(m.name for m in parts.modules)}; "
              f"{why}; disk over {args.transport}; dd {args.dd_mib} MiB, "
              f"{args.dsync_writes} dsync writes; load average at start {loadavg()}",
              flush=True)
        for i in range(args.rounds):
            run = {}
            for cfg in CONFIGS:
                run[cfg] = run_config(cfg, work / f"round{i}-{cfg}", args, parts, initrd, kvm)
                print(f"  round {i + 1} {cfg:<12} dd 1M {mib_s(run[cfg]['dd1m']):6.1f} MiB/s, "
                      f"4K dsync {per_write_us(run[cfg]['dsync4k']):6.0f} us/write "
                      f"(guest {run[cfg]['wall_s']:.0f} s, load {loadavg()})", flush=True)
            rounds.append(run)
    finally:
        kill_all()
        shutil.rmtree(work, ignore_errors=True)
    figures = report(args, rounds, kvm, parts)
    if args.json:
        notes = [f"The guest ({'KVM' if kvm else 'TCG'}, 1 vCPU) saw /dev/vda over "
                 f"{args.transport} as {rounds[0]['unprotected']['disk']}"
                 + (": QSD's vhost-user-blk export starts with its write cache off, so "
                    "QSD completes each write only once its image is flushed and the guest "
                    "sends no flushes of its own" if args.transport == "vhost-user-blk" else "")
                 + f"; the dd 1M run of unprotected took "
                 f"{statistics.median(r['unprotected']['dd1m']['seconds'] for r in rounds):.3f}"
                 " s (median), so its figures move with the machine's load."]
        print("BENCH-JSON " + json.dumps({"bench": "guest", "figures": figures, "notes": notes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""make demo: protect a small VM disk, break things, fail over, prove it identical.

Everything runs on this machine, on loopback and unix sockets:

    qemu-storage-daemon (disk.raw, an ext4 file system)
        │ active mirror, write-blocking
        └──NBD──> repagent.py protect ──TCP──> rephub.py serve (replica + journal)

The "guest" is this script: it changes the ext4 file system the way a VM
would, by writing blocks through QSD's NBD export.  Each phase turns the
disk into a new valid file system (built beforehand with debugfs on a copy),
so every checkpoint is a file system that e2fsck and debugfs can read back.

Every command is appended to WORK/commands.log so each step can be repeated
by hand.  The work dir is ./demo-work (or $DEMO_WORK), made anew each run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import nbd  # noqa: E402  (the project's own NBD client)
import repagent  # noqa: E402  (status is polled over the control sockets, in process:
import rephub  # noqa: E402   a python3 per poll would compete with the daemons for CPU)

PY = sys.executable
MiB = 1024 * 1024
DISK_SIZE = 64 * MiB
BLOCK = 4096
AGENT_ID = "demo-host"
VOLUME = "vm1-disk0"
#: Every wait in the demo is bounded; a step that takes longer has failed.
STEP_TIMEOUT = 120.0
#: A status query a daemon does not answer in this time counts as "not up yet".
STATUS_TIMEOUT = 10.0


class DemoError(Exception):
    pass


class Demo:
    def __init__(self, work: str):
        self.work = work
        # Unix socket paths must stay under 108 bytes: keep them in a short dir.
        self.run_dir = tempfile.mkdtemp(prefix="rpdemo-", dir="/tmp")
        self.log_path = os.path.join(work, "commands.log")
        self.procs: dict[str, subprocess.Popen] = {}
        self.hub_addr = None
        self.t0 = time.monotonic()

    # -- presentation ---------------------------------------------------------

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    def step(self, title: str) -> None:
        print(f"\n== {title}", flush=True)
        self.record(f"\n# {title}")

    def record(self, line: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    # -- processes ------------------------------------------------------------

    def run(self, *cmd: str, quiet: bool = False) -> str:
        """Run a command to completion, log it, return its stdout."""
        self.record(shlex.join(cmd))
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=self.work, timeout=STEP_TIMEOUT)
        if res.returncode != 0:
            raise DemoError(f"{shlex.join(cmd)} failed ({res.returncode}):\n{res.stderr.strip()}")
        if not quiet and res.stdout.strip():
            for line in res.stdout.rstrip().splitlines():
                print(f"    {line}")
        return res.stdout

    def start(self, name: str, *cmd: str) -> subprocess.Popen:
        """Start a daemon with its output in WORK/<name>.log."""
        self.record(shlex.join(cmd) + f" > {name}.log 2>&1 &")
        out = open(os.path.join(self.work, f"{name}.log"), "ab")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=self.work)
        out.close()
        self.procs[name] = proc
        return proc

    def stop(self, name: str, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return proc.returncode if proc else 0
        self.record(f"kill -{signal.Signals(sig).name} <{name} pid>")
        proc.send_signal(sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(5)

    def show_logs(self, lines: int = 15) -> None:
        """The end of each daemon's log, so a failed run explains itself."""
        for name in ("hub", "agent", "qsd", "recovery"):
            path = os.path.join(self.work, f"{name}.log")
            if os.path.exists(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    tail = f.readlines()[-lines:]
                print(f"--- last lines of {path}\n" + "".join(tail), end="", file=sys.stderr)

    def stop_all(self) -> None:
        for name in ("recovery", "agent", "hub", "qsd"):
            self.stop(name)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def wait_for(self, what: str, predicate, timeout: float = STEP_TIMEOUT, show=None):
        """Poll ``predicate`` until it returns a true value or the deadline passes."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise DemoError(f"{name} exited with {proc.returncode} while waiting "
                                    f"for {what}; see {self.work}/{name}.log")
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")
            if show:
                show()
            time.sleep(0.2)  # polling interval of a bounded wait, not synchronisation

    # -- the hub and agent's own status ---------------------------------------

    # What `rephub.py status --json` and `repagent.py status --json` print,
    # asked over the same control sockets; None while a daemon is not up.

    def hub_status(self) -> dict | None:
        try:
            return rephub.control_request(os.path.join(self.work, "hub"), {"cmd": "status"},
                                          timeout=STATUS_TIMEOUT)
        except (OSError, ValueError, rephub.CommandError):
            return None

    def hub_volume(self) -> dict | None:
        st = self.hub_status()
        for vol in (st or {}).get("volumes", []):
            if vol["name"] == VOLUME:
                return vol
        return None

    def agent_status(self) -> dict | None:
        try:
            return repagent.query_status(os.path.join(self.work, "agent"), timeout=STATUS_TIMEOUT)
        except (OSError, ValueError):
            return None

    def quiet(self) -> bool:
        """True once the hub holds every write: consistent, nothing dirty or queued."""
        vol, agent = self.hub_volume(), self.agent_status()
        if not vol or not agent or vol["state"] != "consistent" or vol["lag_bytes"]:
            return False
        if vol.get("sync") and vol["sync"].get("running"):
            return False
        return all(v["dirty_bytes"] == 0 and v["queue_bytes"] == 0 and v["attached"]
                   for v in agent["volumes"])


def progress_bar(percent: float, width: int = 30) -> str:
    filled = int(width * min(percent, 100.0) / 100)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def block_diff(old: str, new: str) -> list[tuple[int, bytes]]:
    """The 4 KiB blocks that turn image ``old`` into image ``new``."""
    out = []
    with open(old, "rb") as a, open(new, "rb") as b:
        offset = 0
        while True:
            x, y = a.read(BLOCK), b.read(BLOCK)
            if not y:
                return out
            if x != y:
                out.append((offset, y))
            offset += BLOCK


def make_seed(folder: str, files: dict[str, str]) -> None:
    os.makedirs(folder, exist_ok=True)
    for name, text in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(text)


def main() -> int:
    work = os.path.abspath(os.environ.get("DEMO_WORK", os.path.join(ROOT, "demo-work")))
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    demo = Demo(work)
    try:
        return scenario(demo)
    except DemoError as err:
        print(f"\ndemo FAILED: {err}", file=sys.stderr)
        demo.show_logs()
        return 1
    finally:
        demo.stop_all()
        print(f"\nEvery command is in {demo.log_path}; daemon logs are beside it.")


def scenario(demo: Demo) -> int:
    rng = random.Random(2012)
    run_dir = demo.run_dir
    qmp, export = f"{run_dir}/qmp.sock", f"{run_dir}/disk0.sock"

    demo.step("1. A VM disk with real content: ext4, and the two versions the guest will write")
    seed = os.path.join(demo.work, "seed")
    make_seed(seed, {"README.txt": "This disk is protected by repagent and rephub.\n",
                     "motd": "version 1\n"})
    demo.run("mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "vm1", "-d", seed, "disk.raw", "64M")
    # The guest's future states, made on copies with debugfs (guest-like writes).
    versions = {"v2": {"motd": "version 2: after the first upgrade\n",
                       "orders.csv": "".join(f"{i},{rng.randrange(10**6)}\n" for i in range(150000))},
                "v3": {"motd": "version 3: after the second upgrade\n",
                       "audit.log": "".join(f"event {i}\n" for i in range(300000))}}
    shutil.copy(os.path.join(demo.work, "disk.raw"), os.path.join(demo.work, "v1.img"))
    previous = "v1.img"
    for name, files in versions.items():
        shutil.copy(os.path.join(demo.work, previous), os.path.join(demo.work, f"{name}.img"))
        make_seed(os.path.join(demo.work, f"seed-{name}"), files)
        cmds = "".join(f"rm /{f}\nwrite seed-{name}/{f} /{f}\n" for f in files)
        with open(os.path.join(demo.work, f"{name}.debugfs"), "w") as f:
            f.write(cmds)
        demo.run("debugfs", "-w", "-f", f"{name}.debugfs", f"{name}.img", quiet=True)
        previous = f"{name}.img"
    demo.say(f"disk.raw: {human(DISK_SIZE)} ext4 with {len(os.listdir(seed))} files")

    demo.step("2. Start the hub (recovery site) and register the agent")
    os.makedirs(os.path.join(demo.work, "hub"))
    secret = demo.run(PY, f"{ROOT}/rephub.py", "add-agent", "--agents", "agents", AGENT_ID,
                      quiet=True).strip().split()[-1]
    with open(os.path.join(demo.work, "secret"), "w") as f:
        f.write(secret + "\n")
    os.chmod(os.path.join(demo.work, "secret"), 0o600)
    demo.record("# (the secret printed by add-agent is saved in the file secret)")
    port = free_port()
    demo.hub_addr = f"127.0.0.1:{port}"
    hub_cmd = [PY, f"{ROOT}/rephub.py", "serve", "--data", "hub", "--listen", demo.hub_addr,
               "--agents", "agents"]
    demo.start("hub", *hub_cmd)
    demo.wait_for("the hub", demo.hub_status, timeout=30)
    demo.say(f"rephub listening on {demo.hub_addr}")

    demo.step("3. Start qemu-storage-daemon with the disk, as the VM's host would")
    demo.start("qsd", "qemu-storage-daemon",
               "--chardev", f"socket,id=qmp0,path={qmp},server=on,wait=off",
               "--monitor", "chardev=qmp0",
               "--blockdev", "driver=file,node-name=disk0-file,filename=disk.raw",
               "--blockdev", "driver=raw,node-name=disk0,file=disk0-file",
               "--nbd-server", f"addr.type=unix,addr.path={export}",
               "--export", "type=nbd,id=exp0,node-name=disk0,name=disk0,writable=on")
    demo.wait_for("QSD's sockets", lambda: os.path.exists(qmp) and os.path.exists(export), 30)

    demo.step("4. Protect it: repagent sets up the mirror; the hub pulls the initial copy")
    demo.start("agent", PY, f"{ROOT}/repagent.py", "protect", "--hub", demo.hub_addr,
               "--agent-id", AGENT_ID, "--secret-file", "secret", "--qmp", qmp,
               "--node", f"disk0={VOLUME}",
               "--source", f"disk0=nbd+unix:///disk0?socket={export}",
               "--state-dir", "agent", "--mode", "async")

    def show_sync():
        vol = demo.hub_volume()
        sync = (vol or {}).get("sync") or {}
        if sync.get("bytes_total"):
            eta = sync.get("eta_s")
            print(f"\r    initial sync {progress_bar(sync['percent'])} {sync['percent']:5.1f}% "
                  f"{human(sync.get('rate', 0))}/s ETA {eta if eta is None else round(eta, 1)}s ",
                  end="", flush=True)

    demo.wait_for("the initial sync", demo.quiet, show=show_sync)
    print()
    vol = demo.hub_volume()
    counters = demo.agent_status()["volumes"][0]["counters"]
    demo.say(f"{VOLUME}: {vol['state']}; the agent sent {human(counters.get('read_reply_bytes', 0))} "
             f"of data for a {human(vol['size'])} disk ({counters.get('zero_replies', 0)} zero "
             "pieces answered without data)")

    demo.step("5. The guest writes (upgrade to v2) while replication runs: live lag (RPO)")
    with nbd.NBDClient(export, "disk0") as disk:
        guest_writes(demo, disk, block_diff(os.path.join(demo.work, "v1.img"),
                                            os.path.join(demo.work, "v2.img")), rng)
        disk.flush()
    # The checkpoint travels in the agent's stream: it lands after every write
    # QEMU had completed, so it names exactly the guest's v2.
    demo.run(PY, f"{ROOT}/repagent.py", "checkpoint", "--state-dir", "agent", "v2")
    demo.wait_for("replication to catch up", demo.quiet)

    demo.step("6. The hub restarts in the middle of the next upgrade (v3): automatic resync")
    with nbd.NBDClient(export, "disk0") as disk:
        writes = block_diff(os.path.join(demo.work, "v2.img"), os.path.join(demo.work, "v3.img"))
        half = len(writes) // 2
        rng.shuffle(writes)
        guest_writes(demo, disk, writes[:half], rng, shuffle=False)
        demo.say("killing the hub (SIGKILL): the agent keeps acknowledging QEMU, marking its bitmap")
        demo.stop("hub", signal.SIGKILL)
        guest_writes(demo, disk, writes[half:], rng, shuffle=False)
        disk.flush()
    agent = demo.agent_status()
    demo.say(f"agent while the hub is down: {agent['connection']}, "
             f"{human(sum(v['dirty_bytes'] for v in agent['volumes']))} marked dirty")
    demo.start("hub", *hub_cmd)
    demo.wait_for("the agent to reconnect and resync", demo.quiet)
    vol = demo.hub_volume()
    sync = vol.get("sync") or {}
    demo.say(f"resynced: plan {sync.get('plan')}, {human(sync.get('bytes_fetched', 0))} fetched "
             f"(not {human(DISK_SIZE)})")
    demo.run(PY, f"{ROOT}/repagent.py", "checkpoint", "--state-dir", "agent", "v3")
    demo.run(PY, f"{ROOT}/rephub.py", "points", "--data", "hub", VOLUME)

    demo.step("7. Fail-over test: a recovery agent serves checkpoint v2; replication goes on")
    recovery_sock = f"{run_dir}/recovery.sock"
    recovery = demo.start("recovery", PY, f"{ROOT}/repagent.py", "recover", "--hub", demo.hub_addr,
                          "--agent-id", AGENT_ID, "--secret-file", "secret", "--volume", VOLUME,
                          "--at", "v2", "--test", "--listen", f"unix:{recovery_sock}")
    demo.wait_for("the recovery export", lambda: export_uri(demo, "recovery"), timeout=60)
    uri = export_uri(demo, "recovery")
    demo.say(f"recovery export ready: {uri}")
    # What a recovery VM would do: read its disk, and write to it (scratch overlay).
    demo.run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, "at-v2.raw")
    demo.run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", uri, quiet=True)
    demo.run("e2fsck", "-f", "-n", "at-v2.raw", quiet=True)
    motd = demo.run("debugfs", "-R", "cat /motd", "at-v2.raw", quiet=True).strip()
    demo.say(f"e2fsck: clean; /motd at v2 reads {motd!r}")
    if motd != versions["v2"]["motd"].strip():
        raise DemoError(f"/motd at v2 is {motd!r}, expected {versions['v2']['motd'].strip()!r}")
    if sha256_file(os.path.join(demo.work, "at-v2.raw")) != sha256_file(
            os.path.join(demo.work, "v2.img")):
        raise DemoError("the image at checkpoint v2 differs from the guest's v2")
    demo.say("the disk at checkpoint v2 is byte-identical to the guest's v2")
    with nbd.NBDClient(export, "disk0") as disk:
        disk.write(DISK_SIZE - BLOCK, b"still protected during the test".ljust(BLOCK, b"."))
        disk.flush()
    if demo.stop("recovery") != 0:
        raise DemoError(f"the recovery agent did not close its test cleanly; see {demo.work}/recovery.log")
    demo.wait_for("replication to catch up", demo.quiet)
    demo.say("test closed: its scratch writes are discarded, the protected write replicated")

    demo.step("8. Proof: source sha256 == replica sha256")
    demo.run(PY, f"{ROOT}/rephub.py", "status", "--data", "hub")
    demo.stop("agent")
    demo.stop("qsd")
    demo.run(PY, f"{ROOT}/rephub.py", "export", "--data", "hub", VOLUME, "--at", "latest",
             "-o", "latest.raw", quiet=True)
    source = sha256_file(os.path.join(demo.work, "disk.raw"))
    replica = sha256_file(os.path.join(demo.work, "latest.raw"))
    print(f"    source  sha256 {source}\n    replica sha256 {replica}")
    if source != replica:
        raise DemoError("the replica differs from the source")
    demo.say("identical. The demo stops every process and exits 0.")
    return 0


def guest_writes(demo: Demo, disk: nbd.NBDClient, writes, rng, shuffle=True) -> None:
    """Write blocks through QSD's export, printing the hub's lag as we go."""
    if shuffle:
        writes = list(writes)
        rng.shuffle(writes)
    last = 0.0
    for i, (offset, data) in enumerate(writes):
        disk.write(offset, data)
        now = time.monotonic()
        if now - last > 0.5 or i == len(writes) - 1:
            last = now
            vol = demo.hub_volume()
            lag = f"lag {vol['lag_s']:.2f}s / {human(vol['lag_bytes'])}" if vol else "hub down"
            print(f"\r    {i + 1}/{len(writes)} blocks written, {lag}          ",
                  end="", flush=True)
    print()


def export_uri(demo: Demo, name: str) -> str | None:
    """The NBD URI a recovery agent prints on stdout once its export is ready."""
    with open(os.path.join(demo.work, f"{name}.log"), encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("nbd"):
                return line.strip()
    return None


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Where the time of a 4 KiB guest write goes: profiles of repagent and rephub
under QD1 and QD16 random 4 KiB writes, and the stages of one sync-mode write.

The load is the real one: a fresh qemu-storage-daemon owns a raw image, its
write-blocking active mirror (docs/QEMU.md) writes into repagent's NBD target,
the agent streams to rephub on 127.0.0.1.  The "guest" is a pipelined NBD
client on QSD's export (QD1: one write at a time; QD16: 16 in flight).
Baseline, same run: the same mirror into qemu-nbd serving a file.

The agent and the hub run as ``bench_profile.py --child agent|hub -- ARGS``:
the unchanged ``repagent.main`` / ``rephub.main`` with, per pass,

* ``plain``: nothing added (the latencies emitted as figures; per-thread CPU
  from /proc/self/task/*/schedstat);
* ``timers``: methods on the write path wrapped with perf_counter_ns stamps
  (CLOCK_MONOTONIC, one clock for both processes), which gives the stages of
  each write: NBD receive, Stream.lock + bitmap mark, queue, send thread
  wake-up, send, hub receive, dispatch, journal append, wait for the group
  commit, fdatasync, ACK sent, ACK received, settle, NBD reply;
* ``cprofile``: one cProfile.Profile per thread (wall clock: a blocking call's
  own time is its wait), merged per process.

A control thread in each child (on a unix socket) resets and dumps the
figures around each load window, so set-up and initial sync are not counted.
The floor is measured in the same run: a loopback TCP ping-pong between two
processes with the frame sizes of one WRITE and its ACK, and an fdatasync
after each 4 KiB append to a file on the hub's file system.

    python3 bench/bench_profile.py [--qd1-ops 2000] [--qd16-ops 16000] [--seconds 6]
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import nbd  # noqa: E402
import protocol  # noqa: E402

KiB, MiB = 1024, 1024 * 1024
now = time.perf_counter_ns
#: Calls whose own wall time is a wait for something else, not work.
WAITS = ("acquire' of '_thread.lock", "acquire' of '_thread.RLock", "select.select",
         "time.sleep", "wait' of", "accept", "'poll' of", "epoll", "recv_into' of",
         "readline' of")


# ===========================================================================
# The child side: repagent.main / rephub.main with probes

class Probe:
    """What a child records; every field is touched under the GIL, one op at a time."""

    def __init__(self, role: str, level: str):
        self.role, self.level = role, level
        self.tls = threading.local()
        self.recs: dict[int, dict] = {}      # request id -> stamps
        self.commits: list[list] = []        # hub: [target seq, take, sync start, sync end]
        self.applies: list[tuple[int, int]] = []   # hub: the applier's batches (start, end)
        self.journal = None
        self.profiles: list[tuple[str, object]] = []
        self.cpu0: dict[int, tuple[int, int]] = {}
        self.t_reset = now()

    # -- reset / dump -----------------------------------------------------------

    def reset(self) -> None:
        self.recs = {}
        self.commits = []
        self.applies = []
        for _, prof in list(self.profiles):
            prof.clear()
        self.cpu0 = task_times()
        self.t_reset = now()

    def dump(self, path: str) -> None:
        wall = now() - self.t_reset
        cpu1 = task_times()
        names = {t.native_id: t.name for t in threading.enumerate()}
        threads = []
        for tid, (run1, wait1) in cpu1.items():
            run0, wait0 = self.cpu0.get(tid, (0, 0))
            threads.append({"name": names.get(tid, f"tid-{tid}"), "cpu_ns": run1 - run0,
                            "runq_ns": wait1 - wait0})
        out = {"role": self.role, "level": self.level, "wall_ns": wall, "threads": threads,
               "recs": [dict(r) for r in list(self.recs.values()) if "req" in r or "rid" in r],
               "commits": [list(c) for c in list(self.commits)],
               "applies": list(self.applies),
               "profile": self.profile_stats()}
        text = json.dumps(out)   # from copies: other threads go on stamping
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)

    def profile_stats(self) -> dict:
        funcs: dict[str, list] = {}
        per_thread: dict[str, float] = {}
        by_thread: dict[str, dict[str, list]] = {}
        for tname, prof in list(self.profiles):
            group = thread_group(tname)
            for e in prof.getstats():
                label = func_label(e.code)
                if "bench_profile.py" in label:
                    continue
                g = by_thread.setdefault(group, {}).setdefault(label, [0, 0.0])
                g[0] += e.callcount
                g[1] += e.inlinetime
                f = funcs.setdefault(label, [0, 0.0, 0.0, set()])
                f[0] += e.callcount
                f[1] += e.inlinetime
                f[2] += e.totaltime
                f[3].add(group)
                if not is_wait(label):
                    per_thread[group] = per_thread.get(group, 0.0) + e.inlinetime
        rows = [{"func": k, "calls": v[0], "own_s": v[1], "cum_s": v[2],
                 "threads": sorted(v[3])} for k, v in funcs.items()]
        own = sorted(rows, key=lambda r: -r["own_s"])[:40]
        cum = sorted((r for r in rows if not is_entry(r["func"])),
                     key=lambda r: -r["cum_s"])[:40]
        tops = {g: [{"func": k, "calls": v[0], "own_s": v[1]} for k, v in
                    sorted(fs.items(), key=lambda kv: -kv[1][1]) if not is_wait(k)][:12]
                for g, fs in by_thread.items()}
        return {"own": own, "cum": cum, "thread_own_s": per_thread, "by_thread": tops}


def task_times() -> dict[int, tuple[int, int]]:
    """ns on CPU and ns waiting for a CPU, per thread of this process (schedstat)."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat", encoding="ascii") as f:
                run, wait, _ = f.read().split()
            out[int(tid)] = (int(run), int(wait))
        except (OSError, ValueError):
            pass
    return out


def thread_group(name: str) -> str:
    for prefix in ("nbd-conn", "acker", "conn", "control", "repagent-sync"):
        if name.startswith(prefix + "-"):
            return prefix
    return name


def func_label(code) -> str:
    if isinstance(code, str):
        return code
    return f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}({code.co_qualname})"


def is_wait(label: str) -> bool:
    return any(w in label for w in WAITS)


def is_entry(label: str) -> bool:
    """Thread bodies and loops: their cumulative time is the thread's life."""
    return bool(re.search(r"threading\.py|\((_send_loop|_recv_loop|run|handle|transmission|"
                          r"_commit_loop|_apply_loop|timer_loop|serve_forever|main|cmd_\w+|"
                          r"<module>)\)", label))


def wrap(cls, name: str, make):
    orig = getattr(cls, name)
    setattr(cls, name, make(orig))


def install_agent_timers(probe: Probe) -> None:
    import repagent
    tls, recs = probe.tls, probe.recs

    def on_write(orig):
        def f(self, *a):
            tls.t0 = now()
            return orig(self, *a)
        return f
    wrap(nbd._Connection, "on_WRITE", on_write)

    def handler_write(orig):
        def f(self, offset, data, reply):
            rec = {"nbd0": getattr(tls, "t0", 0), "h0": now()}
            tls.rec = rec
            try:
                return orig(self, offset, data, reply)
            finally:
                tls.rec = None
                rec["h1"] = now()
        return f
    wrap(repagent.TargetHandler, "write", handler_write)

    def next_req(orig):
        def f(self):
            r = orig(self)
            rec = getattr(tls, "rec", None)
            if rec is not None and "req" not in rec:
                rec["req"] = r
                probe.recs[r] = rec
            return r
        return f
    wrap(repagent.Stream, "next_req", next_req)

    def mark(orig):
        def f(self, chunks):
            t = now()
            orig(self, chunks)
            rec = getattr(tls, "rec", None)
            if rec is not None:
                rec["m0"], rec["m1"] = t, now()
        return f
    wrap(repagent.DirtyBitmap, "mark", mark)

    def put(orig):
        def f(self, *a):
            orig(self, *a)
            rec = getattr(tls, "rec", None)
            if rec is not None:
                rec["q1"] = now()
        return f
    wrap(repagent.HubConnection, "put", put)

    def send_message(orig):
        def f(sock, msg, *rest):
            t = now()
            orig(sock, msg, *rest)
            if type(msg) is protocol.Write:
                rec = probe.recs.get(msg.request_id)
                if rec is not None:
                    rec["s0"], rec["s1"] = t, now()
        return f
    protocol.send_message = send_message(protocol.send_message)

    def on_ack(orig):
        def f(self, conn, msg):
            t = now()
            rec = probe.recs.get(msg.request_id)
            tls.rec = rec
            try:
                orig(self, conn, msg)
            finally:
                tls.rec = None
            if rec is not None:
                rec["k0"], rec["k1"] = t, now()
        return f
    wrap(repagent.HubLink, "on_ACK", on_ack)

    def send_reply(orig):
        def f(self, *a):
            t = now()
            orig(self, *a)
            rec = getattr(tls, "rec", None)
            if rec is not None:
                rec["r0"], rec["r1"] = t, now()
        return f
    wrap(nbd._Connection, "send_reply", send_reply)
    del recs


def install_hub_timers(probe: Probe) -> None:
    import rephub
    tls = probe.tls

    def journal_init(orig):
        def f(self, *a, **k):
            orig(self, *a, **k)
            probe.journal = self
        return f
    wrap(rephub.Journal, "__init__", journal_init)

    def wait_readable(orig):
        def f(self, *a):
            r = orig(self, *a)
            tls.ready = now()
            return r
        return f
    wrap(rephub.AgentSocket, "_wait_readable", wait_readable)

    def recv_frame(orig):
        def f(self, *a):
            r = orig(self, *a)
            if r is not None and type(r[1]) is protocol.Write:
                probe.recs[r[1].request_id] = {"rid": r[1].request_id, "hrx": now(),
                                               "hrdy": getattr(tls, "ready", 0)}
            return r
        return f
    wrap(rephub.AgentConnection, "recv_frame", recv_frame)

    def on_write(orig):
        def f(self, header, msg):
            rec = probe.recs.get(msg.request_id)
            if rec is not None:
                rec["w0"] = now()
            tls.hrec = rec
            try:
                orig(self, header, msg)
            finally:
                tls.hrec = None
            if rec is not None:
                rec["w1"] = now()
        return f
    wrap(rephub.AgentConnection, "on_WRITE", on_write)
    # The recv loop dispatches through a table built when the class was defined.
    rephub.HANDLERS[protocol.MsgType.WRITE] = rephub.AgentConnection.on_WRITE

    def append(orig):
        def f(self, *a, **k):
            t = now()
            r = orig(self, *a, **k)
            rec = getattr(tls, "hrec", None)
            if rec is not None:
                rec["j0"], rec["j1"], rec["seq"] = t, now(), r.seq
            return r
        return f
    wrap(rephub.Journal, "append", append)

    def take(orig):
        def f(self):
            r = orig(self)
            j = probe.journal
            if j is not None and self is j.log:
                probe.commits.append([j.last_seq, now(), 0, 0])
            return r
        return f
    wrap(rephub.SegmentLog, "take_sync_work", take)

    def do_sync(orig):
        def f(self, work):
            t = now()
            orig(self, work)
            j = probe.journal
            if j is not None and self is j.log and probe.commits:
                c = probe.commits[-1]
                c[2], c[3] = t, now()
        return f
    wrap(rephub.SegmentLog, "do_sync", do_sync)

    def apply_batch(orig):
        def f(self, *a):
            t = now()
            try:
                return orig(self, *a)
            finally:
                probe.applies.append((t, now()))
        return f
    wrap(rephub.Applier, "_apply_batch", apply_batch)

    def sending(orig, many: bool):
        def f(sock, msg, *rest):
            t = now()
            orig(sock, msg, *rest)
            t1 = now()
            for m in (msg if many else [msg]):
                rec = probe.recs.get(m.request_id) if type(m) is protocol.Ack else None
                if rec is not None:
                    rec["a0"], rec["a1"] = t, t1
        return f
    protocol.send_message = sending(protocol.send_message, False)
    protocol.send_messages = sending(protocol.send_messages, True)   # the acker's


def install_cprofile(probe: Probe) -> None:
    import cProfile
    orig = threading.Thread._bootstrap_inner

    def bootstrap(self):
        if self.name == "bench-ctl":
            return orig(self)
        prof = cProfile.Profile()
        probe.profiles.append((self.name, prof))
        prof.enable()
        try:
            orig(self)
        finally:
            prof.disable()
    threading.Thread._bootstrap_inner = bootstrap


def serve_ctl(probe: Probe, path: str) -> None:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(4)

    def loop():
        while True:
            conn, _ = srv.accept()
            with conn, conn.makefile("rw", encoding="utf-8") as f:
                for line in f:
                    cmd, _, arg = line.strip().partition(" ")
                    try:
                        if cmd == "reset":
                            probe.reset()
                        elif cmd == "dump":
                            probe.dump(arg)
                        f.write("ok\n")
                    except Exception as err:  # noqa: BLE001 - report it to the parent
                        f.write(f"error {type(err).__name__}: {err}\n")
                    f.flush()
    threading.Thread(target=loop, name="bench-ctl", daemon=True).start()


def child_main(role: str, ctl: str, level: str, argv: list[str]) -> int:
    probe = Probe(role, level)
    serve_ctl(probe, ctl)
    if level == "timers":
        (install_agent_timers if role == "agent" else install_hub_timers)(probe)
    elif level == "cprofile":
        install_cprofile(probe)
    if role == "agent":
        import repagent
        return repagent.main(argv)
    import rephub
    return rephub.main(argv)


# ===========================================================================
# The parent side

def spawn(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def end(proc: subprocess.Popen | None) -> None:
    """SIGTERM the child's process group, then SIGKILL it."""
    if proc is None:
        return
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except OSError:
            pass
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def ctl(path: Path, command: str, timeout: float = 60.0) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall((command + "\n").encode())
        answer = s.makefile("r", encoding="utf-8").readline().strip()
    if answer != "ok":
        raise RuntimeError(f"{path}: {command}: {answer or 'no answer'}")


def pipelined_writes(export: Path, name: str, size: int, qd: int, ops: int,
                     seconds: float, seed: int) -> dict:
    """``ops`` random 4 KiB writes with ``qd`` in flight (at most ``seconds``);
    per-write latency from the request's send to its reply."""
    rng = random.Random(seed)
    block = os.urandom(4 * KiB)
    hdr = nbd.REQUEST_HEADER
    rep = struct.Struct("!IIQ")
    lat: list[int] = []
    with nbd.NBDClient(str(export), name) as client:
        sock = client._sock
        sock.settimeout(30)
        sent_at: dict[int, int] = {}
        buf = bytearray(rep.size)
        view = memoryview(buf)
        handle = 0
        deadline = time.monotonic() + seconds
        t_start = now()

        def send_one():
            nonlocal handle
            handle += 1
            off = rng.randrange(0, size // (4 * KiB)) * 4 * KiB
            sent_at[handle] = now()
            sock.sendall(hdr.pack(nbd.REQUEST_MAGIC, 0, nbd.Command.WRITE, handle, off,
                                  len(block)) + block)
        for _ in range(min(qd, ops)):
            send_one()
        while sent_at:
            got = 0
            while got < rep.size:
                n = sock.recv_into(view[got:])
                if n == 0:
                    raise ConnectionError("QSD closed the export")
                got += n
            t = now()
            magic, error, h = rep.unpack(buf)
            if magic != nbd.SIMPLE_REPLY_MAGIC or error:
                raise RuntimeError(f"reply magic {magic:#x} error {error}")
            lat.append(t - sent_at.pop(h))
            if handle < ops and time.monotonic() < deadline:
                send_one()
        elapsed = now() - t_start
    lat.sort()
    return {"qd": qd, "ops": len(lat), "seconds": elapsed / 1e9,
            "iops": len(lat) / (elapsed / 1e9),
            "p50_us": lat[len(lat) // 2] / 1e3, "p99_us": lat[int(len(lat) * 0.99)] / 1e3}


class Setup:
    """QSD + mirror target (qemu-nbd, or agent + hub under a probe level)."""

    def __init__(self, work: Path, size: int, target: str, level: str = "plain"):
        from qemu_harness import QSD, short_tmpdir
        self.work, self.size, self.target, self.level = work, size, target, level
        self.mode = target.split()[-1]
        work.mkdir(parents=True)
        self.sockdir = short_tmpdir("bp")
        self.state = short_tmpdir("bps")
        extra = [] if target == "qemu-nbd" else [
            "--chardev", f"socket,id=qmp1,path={self.sockdir / 'qmp.sock'},server=on,wait=off",
            "--monitor", "chardev=qmp1"]
        self.qsd = QSD(work / "qsd", size=size, extra_args=extra)
        self.hub = self.agent = self.qnbd = None
        self.ctls: dict[str, Path] = {}

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self) -> None:
        from qemu_harness import QemuNBD, wait_until
        self.qsd.start()
        if self.target == "qemu-nbd":
            image = self.work / "target.raw"
            subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image),
                            str(self.size)], check=True, timeout=60)
            self.qnbd = QemuNBD(image, export_name="tgt").start()
            self.qsd.start_mirror(self.qnbd.export_path, "tgt")
            return
        import rephub
        import repagent
        agents = self.work / "agents.json"
        out = subprocess.run([sys.executable, "rephub.py", "add-agent", "--agents", str(agents),
                              "bench"], cwd=ROOT, capture_output=True, text=True, check=True,
                             timeout=60)
        secret = self.work / "secret"
        secret.write_text(out.stdout.strip().split()[-1] + "\n")
        secret.chmod(0o600)
        me = str(Path(__file__).resolve())
        self.ctls = {"hub": self.sockdir / "hub.ctl", "agent": self.sockdir / "agent.ctl"}
        self.hub = spawn([me, "--child", "hub", "--ctl", str(self.ctls["hub"]),
                          "--level", self.level, "--",
                          "--log-level", "WARNING", "serve", "--data", str(self.work / "hub"),
                          "--listen", "127.0.0.1:0", "--agents", str(agents)],
                         self.work / "hub.log")
        status = wait_until(lambda: _try(lambda: rephub.control_request(
            str(self.work / "hub"), {"cmd": "status"})), 30, "rephub", 0.05)
        self.agent = spawn([me, "--child", "agent", "--ctl", str(self.ctls["agent"]),
                            "--level", self.level, "--",
                            "protect", "--hub", status["listen"], "--agent-id", "bench",
                            "--secret-file", str(secret), "--qmp",
                            str(self.sockdir / "qmp.sock"), "--node", "disk0=bench",
                            "--state-dir", str(self.state), "--mode", self.mode,
                            "--log-level", "WARNING"], self.work / "agent.log")

        def synced():
            st = _try(lambda: repagent.query_status(str(self.state)))
            return st and st["volumes"][0]["attached"] and st["volumes"][0]["dirty_bytes"] == 0 \
                and (self.mode == "async" or st["mode"] == "sync")
        wait_until(synced, 60, "initial sync", 0.05)

    def applied(self) -> None:
        """Wait until the hub's applier has caught up (the initial sync's records too)."""
        if self.hub is None:
            return
        import rephub
        from qemu_harness import wait_until

        def caught_up():
            st = _try(lambda: rephub.control_request(str(self.work / "hub"), {"cmd": "status"}))
            return st and all(v.get("lag_bytes", 1) == 0 for v in st["volumes"])
        wait_until(caught_up, 120, "the hub's applier", 0.05)

    def load(self, qd: int, ops: int, seconds: float) -> dict:
        """One measured window: reset the probes, run the load, dump them."""
        pipelined_writes(self.qsd.export_path, self.qsd.export_name, self.size, qd,
                         min(ops, 200), seconds, seed=qd + 1000)       # warm-up
        self.applied()
        for c in self.ctls.values():
            ctl(c, "reset")
        q0, g0, t0 = proc_cpu(self.qsd.pid), time.process_time(), time.monotonic()
        result = pipelined_writes(self.qsd.export_path, self.qsd.export_name, self.size, qd,
                                  ops, seconds, seed=qd)
        wall = time.monotonic() - t0
        result["qsd_cores"] = (proc_cpu(self.qsd.pid) - q0) / wall
        result["client_cores"] = (time.process_time() - g0) / wall
        result["loadavg"] = loadavg()
        for role, c in self.ctls.items():
            path = self.work / f"{role}-qd{qd}.json"
            ctl(c, f"dump {path}")
            result[role] = json.loads(path.read_text())
        return result

    def close(self) -> None:
        from qemu_harness import kill_all  # noqa: F401 - main calls it at the end
        try:
            self.qsd.kill()
        except Exception:  # noqa: BLE001 - the rest must still be stopped
            pass
        end(self.agent)
        end(self.hub)
        if self.qnbd is not None:
            self.qnbd.stop()
        self.qsd.close()
        shutil.rmtree(self.sockdir, ignore_errors=True)
        shutil.rmtree(self.state, ignore_errors=True)


def _try(fn):
    try:
        return fn()
    except (OSError, ValueError, KeyError):
        return None


def proc_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) of process ``pid`` so far; 0 if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return 0.0


def loadavg() -> str:
    with open("/proc/loadavg", encoding="ascii") as f:
        return " ".join(f.read().split()[:3])


# ---------------------------------------------------------------------------
# The floor

ECHO = r"""
import socket, sys
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
print(srv.getsockname()[1], flush=True)
c, _ = srv.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
n, m = int(sys.argv[1]), int(sys.argv[2]); buf = bytearray(n); v = memoryview(buf)
ack = bytes(m)
while True:
    got = 0
    while got < n:
        k = c.recv_into(v[got:])
        if k == 0: sys.exit(0)
        got += k
    c.sendall(ack)
"""


def frame_sizes() -> tuple[int, int]:
    write = protocol.Write(request_id=1, volume=1, offset=0, length=4 * KiB, data=bytes(4 * KiB))
    ack = protocol.Ack(request_id=1)
    return len(protocol.encode(write)), len(protocol.encode(ack))


def tcp_pingpong(n_ops: int, seconds: float) -> dict:
    wsize, asize = frame_sizes()
    proc = subprocess.Popen([sys.executable, "-c", ECHO, str(wsize), str(asize)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    lat = []
    try:
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            frame, buf = os.urandom(wsize), bytearray(asize)
            view = memoryview(buf)
            deadline = time.monotonic() + seconds
            for i in range(n_ops):
                if time.monotonic() > deadline:
                    break
                t = now()
                s.sendall(frame)
                got = 0
                while got < asize:
                    k = s.recv_into(view[got:])
                    if k == 0:
                        raise ConnectionError("echo server closed")
                    got += k
                lat.append(now() - t)
    finally:
        end(proc)
    lat.sort()
    return {"ops": len(lat), "write_frame": wsize, "ack_frame": asize,
            "p50_us": lat[len(lat) // 2] / 1e3, "p99_us": lat[int(len(lat) * 0.99)] / 1e3}


def fdatasync_append(directory: Path, n_ops: int, seconds: float) -> dict:
    path = directory / "fdatasync.probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    lat = []
    try:
        block = os.urandom(4 * KiB)
        deadline = time.monotonic() + seconds
        for _ in range(n_ops):
            if time.monotonic() > deadline:
                break
            os.write(fd, block)
            t = now()
            os.fdatasync(fd)
            lat.append(now() - t)
    finally:
        os.close(fd)
        path.unlink()
    lat.sort()
    return {"ops": len(lat), "p50_us": lat[len(lat) // 2] / 1e3,
            "p99_us": lat[int(len(lat) * 0.99)] / 1e3}


# ---------------------------------------------------------------------------
# The analysis

#: (stage, from stamp, to stamp, kind); "c0"/"c1" are the covering commit's fdatasync.
#: kind: "work" (per-write code on the path), "handoff" (a thread waking another),
#: "wire" (loopback, the receiver's wake-up included), "disk" (the fdatasync).
STAGES = [
    ("NBD receive (payload, begin, check)", "nbd0", "h0", "work"),
    ("Stream.lock + bitmap mark", "h0", "m1", "work"),
    ("queue (frame, PendingWrite, put)", "m1", "q1", "work"),
    ("send thread wake-up", "q1", "s0", "handoff"),
    ("send (encode + CRC + sendmsg)", "s0", "s1", "work"),
    ("loopback + hub recv wake-up", "s1", "hrdy", "wire"),
    ("hub read + decode (CRC check)", "hrdy", "hrx", "work"),
    ("hub dispatch to Journal.append", "hrx", "j0", "work"),
    ("journal append (writev)", "j0", "j1", "work"),
    ("wait for the group commit", "j1", "c0", "handoff"),
    ("group commit fdatasync", "c0", "c1", "disk"),
    ("acker wake-up", "c1", "a0", "handoff"),
    ("ACK send + loopback + agent recv", "a0", "k0", "wire"),
    ("settle (Stream.acked, bitmap ack)", "k0", "r0", "work"),
    ("NBD reply", "r0", "r1", "work"),
]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(int(len(values) * q), len(values) - 1)]


def stage_table(run: dict) -> tuple[list[dict], dict]:
    agent = {r["req"]: r for r in run["agent"]["recs"] if "req" in r}
    hub = {r["rid"]: r for r in run["hub"]["recs"] if "rid" in r}
    commits = sorted(c for c in run["hub"]["commits"] if c[3])
    targets = [c[0] for c in commits]
    writes = []
    for req, a in agent.items():
        h = hub.get(req)
        if h is None or "seq" not in h:
            continue
        i = bisect.bisect_left(targets, h["seq"])
        if i == len(commits):
            continue
        w = {**a, **h, "c0": commits[i][2], "c1": commits[i][3]}
        if all(k in w for _, a0, b0, _ in STAGES for k in (a0, b0)):
            writes.append(w)
    rows = []
    for name, a, b, kind in STAGES:
        d = [(w[b] - w[a]) / 1e3 for w in writes]
        rows.append({"stage": name, "kind": kind, "p50_us": statistics.median(d),
                     "p99_us": pct(d, 0.99),
                     "mean_us": statistics.fmean(d)})
    total = [(w["r1"] - w["nbd0"]) / 1e3 for w in writes]
    per_commit = len(writes) / max(len({w["c1"] for w in writes}), 1)
    # Writes in flight while the applier ran a batch (same process, same GIL, same disk).
    applies = sorted(run["hub"].get("applies", []))
    starts = [a[0] for a in applies]
    over, clear = [], []
    for w, t in zip(writes, total):
        i = bisect.bisect_left(starts, w["r1"])
        hit = any(applies[j][1] > w["nbd0"] for j in range(max(i - 3, 0), i))
        (over if hit else clear).append(t)
    apply_ns = sum(b - a for a, b in applies)
    return rows, {"writes": len(writes), "p50_us": statistics.median(total),
                  "p99_us": pct(total, 0.99), "writes_per_commit": per_commit,
                  "apply_share": apply_ns / max(run["hub"]["wall_ns"], 1),
                  "apply_batches": len(applies),
                  "overlap": {"n": len(over), "p50_us": statistics.median(over) if over else 0,
                              "p99_us": pct(over, 0.99) if over else 0},
                  "clear": {"n": len(clear), "p50_us": statistics.median(clear) if clear else 0,
                            "p99_us": pct(clear, 0.99) if clear else 0}}


def async_agent_table(run: dict) -> list[tuple[str, float, float]]:
    recs = [r for r in run["agent"]["recs"] if all(k in r for k in ("nbd0", "m1", "q1", "r1"))]
    out = []
    for name, a, b in (("NBD receive", "nbd0", "h0"), ("lock + mark", "h0", "m1"),
                       ("queue", "m1", "q1"), ("NBD reply", "q1", "r1"),
                       ("in the agent, total", "nbd0", "r1")):
        d = [(r[b] - r[a]) / 1e3 for r in recs]
        out.append((name, statistics.median(d), pct(d, 0.99)))
    return out


def print_overlap(tot: dict) -> None:
    o, c = tot["overlap"], tot["clear"]
    print(f"  the applier ran {tot['apply_batches']} batches, busy {tot['apply_share']:.0%} of "
          f"the window; writes in flight during a batch: {o['n']}, p50 {o['p50_us']:.0f} us "
          f"p99 {o['p99_us']:.0f} us; the others: {c['n']}, p50 {c['p50_us']:.0f} us "
          f"p99 {c['p99_us']:.0f} us")


def busy(dump: dict, ops: int) -> list[dict]:
    wall = dump["wall_ns"]
    groups: dict[str, list[int]] = {}
    for t in dump["threads"]:
        g = groups.setdefault(thread_group(t["name"]), [0, 0])
        g[0] += t["cpu_ns"]
        g[1] += t["runq_ns"]
    out = [{"thread": k, "busy": v[0] / wall, "runq": v[1] / wall,
            "cpu_us_per_write": v[0] / 1e3 / max(ops, 1)} for k, v in groups.items()]
    return sorted(out, key=lambda r: -r["busy"])


def process_cpu(dump: dict, ops: int) -> tuple[float, float]:
    cpu = sum(t["cpu_ns"] for t in dump["threads"])
    return cpu / dump["wall_ns"], cpu / 1e3 / max(ops, 1)


def print_profile(dump: dict, ops: int, lines: int) -> None:
    prof = dump["profile"]
    print(f"    own time (wall; 'wait' = blocked in it), us per write, top {lines}:")
    for r in prof["own"][:lines]:
        flag = " wait" if is_wait(r["func"]) else ""
        print(f"      {r['own_s'] * 1e6 / ops:8.1f} us {r['calls'] / ops:6.1f} calls  "
              f"{short(r['func'])}{flag}")
    print(f"    cumulative (thread bodies left out), us per write, top {lines}:")
    for r in prof["cum"][:lines]:
        print(f"      {r['cum_s'] * 1e6 / ops:8.1f} us {r['calls'] / ops:6.1f} calls  "
              f"{short(r['func'])}")


def print_threads(plain: dict, prof: dict, ops: int, prof_ops: int, n: int = 3,
                  lines: int = 5) -> None:
    """The busiest threads (plain pass) and their largest own times (profile pass)."""
    for t in busy(plain, ops)[:n]:
        top = prof["profile"].get("by_thread", {}).get(t["thread"], [])
        if not top:
            continue
        print(f"    {t['thread']} ({t['busy']:.0%} on CPU), own time that is not a wait, "
              f"us per write:")
        for r in top[:lines]:
            print(f"      {r['own_s'] * 1e6 / prof_ops:8.1f} us {r['calls'] / prof_ops:6.1f} calls"
                  f"  {short(r['func'])}")


def short(label: str) -> str:
    label = label.replace("<method '", "<").replace("<built-in method ", "<")
    return label if len(label) <= 70 else label[:67] + "..."


def top_work(dump: dict, ops: int, n: int) -> list[tuple[str, float]]:
    """The ``n`` largest own times that are work, not waits (us per write)."""
    rows = [r for r in dump["profile"]["own"] if not is_wait(r["func"])
            and "recv_into" not in r["func"]]
    return [(short(r["func"]), r["own_s"] * 1e6 / ops) for r in rows[:n]]


# ---------------------------------------------------------------------------

def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        ap = argparse.ArgumentParser()
        ap.add_argument("--child", choices=("agent", "hub"))
        ap.add_argument("--ctl")
        ap.add_argument("--level", choices=("plain", "timers", "cprofile"))
        ap.add_argument("rest", nargs=argparse.REMAINDER)
        a = ap.parse_args()
        rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
        return child_main(a.child, a.ctl, a.level, rest)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--qd1-ops", type=int, default=2000)
    ap.add_argument("--qd16-ops", type=int, default=16000)
    ap.add_argument("--seconds", type=float, default=6.0, help="time limit of one window")
    ap.add_argument("--lines", type=int, default=10, help="lines per profile table")
    ap.add_argument("--json", action="store_true",
                    help="also print a BENCH-JSON line for bench/report.py")
    ap.add_argument("--levels", default="plain,timers,cprofile",
                    help="probe passes to run; the stage tables need timers, the thread tables, "
                         "the summary and --json all three")
    ap.add_argument("--save", help="write the raw measurements to this JSON file")
    ap.add_argument("--load", help="report on a --save file instead of measuring")
    args = ap.parse_args()
    levels = args.levels.split(",")
    if "plain" not in levels or not set(levels) <= {"plain", "timers", "cprofile"}:
        ap.error(f"--levels {args.levels}: plain and any of timers, cprofile")
    if args.json and len(set(levels)) < 3:
        ap.error("--json needs --levels plain,timers,cprofile")
    if args.load:
        raw = json.loads(Path(args.load).read_text())
        return report(args, {tuple(json.loads(k)): v for k, v in raw["res"].items()},
                      raw["floor"])
    from qemu_harness import kill_all, short_tmpdir
    size = args.size_mib * MiB
    work = short_tmpdir("bench-prof")
    loads = ((1, args.qd1_ops), (16, args.qd16_ops))
    res: dict[tuple[str, str], dict] = {}
    print(f"bench_profile: 4 KiB random writes, {args.size_mib} MiB volume, QSD write-blocking "
          f"mirror, guest = pipelined NBD client on QSD's export; windows of at most "
          f"{args.qd1_ops} (QD1) / {args.qd16_ops} (QD16) writes or {args.seconds:g} s; "
          f"load average at start {loadavg()}", flush=True)
    try:
        floor = {"rtt": tcp_pingpong(3000, 5.0), "fsync": fdatasync_append(work, 1000, 5.0),
                 "loadavg": loadavg()}
        plan = [("qemu-nbd", "plain")] + [(f"repagent {m}", lvl) for lvl in
                                          args.levels.split(",")
                                          for m in ("sync", "async")]
        for target, level in plan:
            name = f"{target.replace(' ', '-')}-{level}"
            with Setup(work / name, size, target, level) as s:
                for qd, ops in loads:
                    r = s.load(qd, ops, args.seconds)
                    res[(target, level, qd)] = r
                    print(f"  {target:<16} {level:<8} QD{qd:<2} {r['ops']:>6} writes "
                          f"{r['iops']:>7.0f}/s p50 {r['p50_us']:>6.0f} us p99 "
                          f"{r['p99_us']:>6.0f} us  (load {r['loadavg']})", flush=True)
    finally:
        kill_all()
        shutil.rmtree(work, ignore_errors=True)
    if args.save:
        Path(args.save).write_text(json.dumps(
            {"res": {json.dumps(list(k)): v for k, v in res.items()}, "floor": floor}))
    return report(args, res, floor)


def report(args, res: dict, floor: dict) -> int:
    rtt, fs = floor["rtt"], floor["fsync"]
    floor_us = rtt["p50_us"] + fs["p50_us"]
    print(f"\nfloor (load {floor['loadavg']}): loopback TCP ping-pong of a {rtt['write_frame']} B "
          f"WRITE frame and a {rtt['ack_frame']} B ACK between two processes: p50 "
          f"{rtt['p50_us']:.0f} us, p99 {rtt['p99_us']:.0f} us; fdatasync after a 4 KiB append "
          f"on the hub's file system: p50 {fs['p50_us']:.0f} us, p99 {fs['p99_us']:.0f} us; "
          f"sum of the p50s {floor_us:.0f} us")
    base1 = res[("qemu-nbd", "plain", 1)]
    print("\nguest latency (no probes), ratio to the mirror into qemu-nbd in this run:")
    for qd in (1, 16):
        b = res[("qemu-nbd", "plain", qd)]
        for target in ("qemu-nbd", "repagent sync", "repagent async"):
            r = res[(target, "plain", qd)]
            print(f"  QD{qd:<2} {target:<15} p50 {r['p50_us']:>6.0f} us "
                  f"({r['p50_us'] / b['p50_us']:4.2f}x)"
                  f"  p99 {r['p99_us']:>6.0f} us ({r['p99_us'] / b['p99_us']:4.2f}x)  "
                  f"{r['iops']:>6.0f} writes/s ({r['iops'] / b['iops']:4.2f}x)")

    levels = {level for _, level, _ in res}
    if "timers" not in levels:
        return partial_report(levels)
    # -- the stages of one sync write
    t1 = res[("repagent sync", "timers", 1)]
    rows, tot = stage_table(t1)
    ssum = sum(r["p50_us"] for r in rows)
    print(f"\none sync-mode write, QD1 (timers pass, {tot['writes']} writes, "
          f"{tot['writes_per_commit']:.2f} writes per fdatasync; load {t1['loadavg']}):")
    print(f"  {'stage':<40} {'p50 us':>8} {'p99 us':>8} {'mean us':>8}")
    for r in rows:
        print(f"  {r['stage']:<40} {r['p50_us']:>8.1f} {r['p99_us']:>8.1f} {r['mean_us']:>8.1f}")
    print(f"  {'sum of the stage p50s':<40} {ssum:>8.1f}")
    print(f"  {'NBD receive -> NBD reply, measured':<40} {tot['p50_us']:>8.1f} "
          f"{tot['p99_us']:>8.1f}")
    print(f"  guest latency in this pass: p50 {t1['p50_us']:.0f} us, p99 {t1['p99_us']:.0f} us "
          f"(without probes {res[('repagent sync', 'plain', 1)]['p50_us']:.0f} us); outside "
          f"the agent (QSD, guest client): {t1['p50_us'] - tot['p50_us']:.0f} us")
    print(f"  floor: RTT + fdatasync = {floor_us:.0f} us; agent-side write / floor = "
          f"{tot['p50_us'] / floor_us:.2f}x")
    print_overlap(tot)
    rows16, tot16 = stage_table(res[("repagent sync", "timers", 16)])
    print(f"\nthe same at QD16 ({tot16['writes']} writes, {tot16['writes_per_commit']:.2f} "
          f"writes per fdatasync):")
    for r in rows16:
        print(f"  {r['stage']:<40} {r['p50_us']:>8.1f} {r['p99_us']:>8.1f} {r['mean_us']:>8.1f}")
    print(f"  {'NBD receive -> NBD reply, measured':<40} {tot16['p50_us']:>8.1f} "
          f"{tot16['p99_us']:>8.1f}")
    print_overlap(tot16)
    for qd in (1, 16):
        print(f"\nasync mode QD{qd}, inside the agent (timers pass): stage p50 / p99 us")
        for name, p50, p99 in async_agent_table(res[("repagent async", "timers", qd)]):
            print(f"  {name:<40} {p50:>8.1f} {p99:>8.1f}")

    if "cprofile" not in levels:
        return partial_report(levels)
    # -- threads and profiles
    for mode in ("sync", "async"):
        for qd in (1, 16):
            plain = res[(f"repagent {mode}", "plain", qd)]
            prof = res[(f"repagent {mode}", "cprofile", qd)]
            print(f"\n== {mode} QD{qd}: {plain['ops']} writes, {plain['iops']:.0f}/s; QSD "
                  f"{plain.get('qsd_cores', 0):.2f} cores, load generator "
                  f"{plain.get('client_cores', 0):.2f} cores "
                  f"(load {plain['loadavg']}; profile pass {prof['ops']} writes "
                  f"{prof['iops']:.0f}/s, load {prof['loadavg']})")
            for role in ("agent", "hub"):
                share, per = process_cpu(plain[role], plain["ops"])
                print(f"  {role}: {share:.2f} cores, {per:.0f} us CPU per write; threads "
                      "(fraction of wall time on CPU / waiting for a CPU, us CPU per write):")
                for t in busy(plain[role], plain["ops"])[:5]:
                    if t["busy"] >= 0.005:
                        print(f"    {t['thread']:<22} {t['busy']:5.2f} / {t['runq']:4.2f}  "
                              f"{t['cpu_us_per_write']:6.1f}")
                print_profile(prof[role], prof["ops"], args.lines)
                print_threads(plain[role], prof[role], plain["ops"], prof["ops"])

    print("\nwhere the time goes:")
    for line in summary(res, floor, rows, tot, rows16, tot16):
        print("  - " + line)
    if args.json:
        emit_json(args, res, floor, rows, tot, rows16, tot16)
    return 0


def partial_report(levels: set) -> int:
    """What a run without every probe pass reports: the passes it had, no more."""
    print(f"\n(passes run: {', '.join(sorted(levels))}; the thread tables, the summary and "
          "--json need --levels plain,timers,cprofile)")
    return 0


def func(dump: dict, needle: str, ops: int) -> tuple[float, float]:
    """Own us per write and calls per write of the profiled function matching ``needle``."""
    for r in dump["profile"]["own"]:
        if needle in r["func"]:
            return r["own_s"] * 1e6 / ops, r["calls"] / ops
    return 0.0, 0.0


def thread(dump: dict, name: str, ops: int) -> dict:
    return next((t for t in busy(dump, ops) if t["thread"] == name),
                {"busy": 0.0, "runq": 0.0, "cpu_us_per_write": 0.0})


def tops(prof_run: dict, role: str, thread_name: str, n: int = 3) -> str:
    """``thread_name``'s largest own times that are not waits, per write (profile pass)."""
    rows = prof_run[role]["profile"].get("by_thread", {}).get(thread_name, [])[:n]
    return ", ".join(f"{short(r['func'])} {r['own_s'] * 1e6 / prof_run['ops']:.0f} us"
                     for r in rows)


def summary(res, floor, rows, tot, rows16, tot16) -> list[str]:
    """The "Where the time goes" lines, every number from this run."""
    rtt, fs = floor["rtt"]["p50_us"], floor["fsync"]["p50_us"]
    b1, b16 = res[("qemu-nbd", "plain", 1)], res[("qemu-nbd", "plain", 16)]
    s1, s16 = res[("repagent sync", "plain", 1)], res[("repagent sync", "plain", 16)]
    a1, a16 = res[("repagent async", "plain", 1)], res[("repagent async", "plain", 16)]
    t1 = res[("repagent sync", "timers", 1)]
    pr1, pr16 = res[("repagent sync", "cprofile", 1)], res[("repagent sync", "cprofile", 16)]
    pa16 = res[("repagent async", "cprofile", 16)]
    kind = {k: sum(r["p50_us"] for r in rows if r["kind"] == k)
            for k in ("work", "handoff", "wire", "disk")}
    nwork = sum(1 for r in rows if r["kind"] == "work")
    big = sorted((r for r in rows if r["kind"] == "work"), key=lambda r: -r["p50_us"])[:3]
    stage16 = {r["stage"]: r for r in rows16}
    o, c = tot["overlap"], tot["clear"]
    app1 = thread(s1["hub"], "applier", s1["ops"])
    conn16 = thread(s16["hub"], "conn", s16["ops"])
    app16 = thread(s16["hub"], "applier", s16["ops"])
    nbd16 = thread(a16["agent"], "nbd-conn", a16["ops"])
    slow16 = max(rows16, key=lambda r: r["p50_us"])
    asy1 = async_agent_table(res[("repagent async", "timers", 1)])
    asy16 = async_agent_table(res[("repagent async", "timers", 16)])
    hand = ", ".join(f"{r['stage']} {r['p50_us']:.0f}" for r in rows if r["kind"] == "handoff")
    removable = sorted([
        (app1["cpu_us_per_write"], "the applier's CPU per write at QD1 sync (off the path, "
         "but it takes a core share, the GIL and the disk beside the path; p99 of the writes "
         f"beside a batch {o['p99_us']:.0f} us against {c['p99_us']:.0f} us)"),
        (kind["work"], f"per-write Python steps on the path ({nwork} steps at QD1; at QD16 "
         "they serialise on the hub's connection thread and the agent's nbd-conn thread)"),
        (kind["handoff"], f"thread hand-offs per sync write ({hand})"),
        (kind["wire"] - rtt, "the two loopback legs beyond the ping-pong's round trip "
         "(the receiving threads' wake-ups)"),
        (kind["disk"] - fs, "the group commit's fdatasync beyond a lone 4 KiB fdatasync "
         "(the applier's fdatasyncs on the same disk)"),
    ], key=lambda x: -x[0])
    return [
        f"QD1 sync: the guest's 4 KiB write takes {s1['p50_us']:.0f} us at p50 "
        f"({s1['p50_us'] / b1['p50_us']:.2f}x the mirror into qemu-nbd, {b1['p50_us']:.0f} us). "
        f"With the stage probes on (guest p50 {t1['p50_us']:.0f} us in that pass) "
        f"{tot['p50_us']:.0f} us is inside agent + hub, against a floor of {rtt + fs:.0f} us "
        f"(loopback round trip {rtt:.0f} us + one 4 KiB fdatasync {fs:.0f} us): "
        f"{tot['p50_us'] / (rtt + fs):.1f}x the floor.",
        f"Its stage p50s ({sum(kind.values()):.0f} us): per-write code {kind['work']:.0f} us "
        f"in {nwork} steps (largest: "
        + ", ".join(f"{r['stage']} {r['p50_us']:.0f}" for r in big)
        + f"); thread hand-offs {kind['handoff']:.0f} us; the two loopback legs with the "
        f"receivers' wake-ups {kind['wire']:.0f} us (ping-pong {rtt:.0f} us); the group "
        f"commit's fdatasync {kind['disk']:.0f} us (alone: {fs:.0f} us), "
        f"{tot['writes_per_commit']:.2f} writes per fdatasync.",
        f"Off the path, the hub's applier uses the most CPU: {app1['busy']:.2f} cores at QD1 "
        f"sync, {app1['cpu_us_per_write']:.0f} us per write (whole hub "
        f"{process_cpu(s1['hub'], s1['ops'])[1]:.0f} us, agent "
        f"{process_cpu(s1['agent'], s1['ops'])[1]:.0f} us); its largest own times (cProfile): "
        f"{tops(pr1, 'hub', 'applier')}.  Writes in flight while it ran a batch "
        f"({tot['apply_share']:.0%} of the time): p50 {o['p50_us']:.0f} us, p99 "
        f"{o['p99_us']:.0f} us; the others p50 {c['p50_us']:.0f} us, p99 {c['p99_us']:.0f} us.",
        f"QD16 sync: {s16['iops']:.0f} writes/s ({s16['iops'] / b16['iops']:.2f}x qemu-nbd's "
        f"{b16['iops']:.0f}/s; {s16['iops'] / s1['iops']:.1f}x QD1), "
        f"{tot16['writes_per_commit']:.1f} writes per fdatasync.  The largest stage is "
        f"'{slow16['stage']}' at {slow16['p50_us']:.0f} us p50: WRITE frames wait in the "
        f"socket for the hub's connection thread, which takes one frame at a time and is on "
        f"a CPU {conn16['busy']:.0%} / waiting for one {conn16['runq']:.0%} of the time "
        f"({conn16['cpu_us_per_write']:.0f} us CPU per write; largest own times "
        f"{tops(pr16, 'hub', 'conn')}), beside the applier at {app16['busy']:.0%}.  Send "
        f"thread wake-up {stage16['send thread wake-up']['p50_us']:.0f} us, wait for the group "
        f"commit {stage16['wait for the group commit']['p50_us']:.0f} us.",
        f"Async: QD1 p50 {a1['p50_us']:.0f} us ({a1['p50_us'] / b1['p50_us']:.2f}x), p99 "
        f"{a1['p99_us']:.0f} us ({a1['p99_us'] / b1['p99_us']:.2f}x); the agent holds a write "
        f"{asy1[-1][1]:.0f} us (p99 {asy1[-1][2]:.0f} us).  QD16 p99 {a16['p99_us']:.0f} us "
        f"({a16['p99_us'] / b16['p99_us']:.2f}x) while a write spends p99 "
        f"{asy16[-1][2]:.0f} us in the agent: the rest is outside the agent's span (in QSD, "
        f"or in the socket before the agent's one nbd-conn thread reads the request: it "
        f"reads one at a time and was on a CPU {nbd16['busy']:.0%}, waiting for one "
        f"{nbd16['runq']:.0%}; {nbd16['cpu_us_per_write']:.0f} us CPU per write; largest own "
        f"times {tops(pa16, 'agent', 'nbd-conn')}); agent + hub used "
        f"{process_cpu(a16['agent'], a16['ops'])[0] + process_cpu(a16['hub'], a16['ops'])[0]:.2f}"
        f" of the {os.cpu_count()} cores, QSD {a16.get('qsd_cores', 0):.2f}, the load generator "
        f"{a16.get('client_cores', 0):.2f}.",
        "Removable, largest first (us per write at QD1 sync): " + "; ".join(
            f"({i}) {size:.0f} us, {what}" for i, (size, what) in enumerate(removable, 1))
        + ".  The payload is not copied on the way (sendmsg scatter/gather, writev).",
    ]


def emit_json(args, res, floor, rows, tot, rows16, tot16) -> None:
    floor_us = floor["rtt"]["p50_us"] + floor["fsync"]["p50_us"]
    figures, notes = [], []
    for qd in (1, 16):
        b = res[("qemu-nbd", "plain", qd)]
        for mode in ("sync", "async"):
            r = res[(f"repagent {mode}", "plain", qd)]
            for k in ("p50_us", "p99_us"):
                fig = {"name": f"guest 4 KiB random write {k[:3]} QD{qd}, repagent {mode}",
                       "value": round(r[k]), "unit": "us",
                       "baseline_name": "mirror into qemu-nbd", "baseline": round(b[k]),
                       "ratio": round(r[k] / b[k], 2),
                       "note": f"one round, {r['ops']} writes, load {r['loadavg']}"}
                if qd == 1 and (mode, k) in (("sync", "p50_us"), ("async", "p99_us")):
                    fig.update(target="<= 1.5x", met=r[k] / b[k] <= 1.5)
                figures.append(fig)
    figures.append({"name": "one sync write inside agent + hub, p50 QD1 (NBD receive to NBD "
                            "reply, stage probes on)", "value": round(tot["p50_us"]),
                    "unit": "us", "baseline_name": "loopback RTT + one fdatasync",
                    "baseline": round(floor_us), "ratio": round(tot["p50_us"] / floor_us, 2)})
    for qd in (1, 16):
        s, b = res[("repagent sync", "plain", qd)], res[("qemu-nbd", "plain", qd)]
        figures.append({"name": f"sync QD{qd} 4 KiB writes/s", "value": round(s["iops"]),
                        "unit": "writes/s", "baseline_name": "mirror into qemu-nbd",
                        "baseline": round(b["iops"]), "ratio": round(s["iops"] / b["iops"], 2)})
    lines = summary(res, floor, rows, tot, rows16, tot16)
    print("BENCH-JSON " + json.dumps({"bench": "profile", "figures": figures, "notes": notes,
                                      "section": {"title": "Where the time goes",
                                                  "lines": lines}}))


if __name__ == "__main__":
    sys.exit(main())

"""Fail-back end to end (issue 8): the VM comes home without a full copy.

Real processes on loopback: ``qemu-storage-daemon`` owning the protected
disk (node ``disk0``; a writable export ``disk0`` plays the VM, a read-only
export ``src0`` is the agent's ``--source``), ``repagent.py protect
--accept-failback`` (sync mode, so a guest write returns once the hub has it),
``rephub.py serve`` and ``repagent.py recover --failover`` serving the
recovery VM, which ``qemu-io`` drives.

The story: protect; checkpoint ``good``; more writes (``bad``); fail over at
``good`` (the writes after it are set aside); the recovery VM writes; the old
site writes too after the fail-over (refused by the hub: late writes, kept in
the agent's dirty bitmap); the old site goes down and comes back; its VM is
stopped (export removed); ``rephub.py failback`` reports the late writes,
sends the delta and gives the volume back.  Then the old disk equals the
recovery volume, the delta was sent and nothing much more, the late writes are
reported and kept, and protection resumes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import nbd
import repagent as ra
from oracle import StreamModel
from procs import AgentProc, HubProc, end, start_recover
from qemu_harness import QSD, MiB, kill_all, nbd_sha256, qemu_io, requires_qemu, short_tmpdir, \
    wait_until

ROOT = Path(__file__).resolve().parent.parent
SIZE = 16 * MiB
CHUNK = 64 * 1024
VOL = "vola"

pytestmark = requires_qemu


def py(*argv, check=True, timeout=120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def pattern(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


class Extents:
    """A set of byte ranges, kept merged."""

    def __init__(self):
        self.ranges: list[tuple[int, int]] = []

    def add(self, offset: int, length: int) -> None:
        merged, start, stop = [], offset, offset + length
        for a, b in self.ranges:
            if b < start or a > stop:
                merged.append((a, b))
            else:
                start, stop = min(a, start), max(b, stop)
        self.ranges = sorted(merged + [(start, stop)])

    def chunk_aligned(self) -> "Extents":
        out = Extents()
        for a, b in self.ranges:
            a0 = a // CHUNK * CHUNK
            out.add(a0, -(-b // CHUNK) * CHUNK - a0)
        return out

    def union(self, other: "Extents") -> "Extents":
        out = Extents()
        for a, b in self.ranges + other.ranges:
            out.add(a, b - a)
        return out

    @property
    def bytes(self) -> int:
        return sum(b - a for a, b in self.ranges)


class Sites:
    """The protected site (QSD + agent) and the recovery site (hub + recovery agent)."""

    def __init__(self, work: Path):
        self.work = work
        self.hub = HubProc(work, agent_ids=("agent1",)).start()
        self.rec_secret = self.hub.add_agent("rec1", recover_for=("agent1",))
        # The harness keeps QSD's first monitor, the agent has the second, the
        # operator's `repagent.py qmp` the third.
        self.agent_qmp = work / "agent-qmp.sock"
        self.admin_qmp = work / "admin-qmp.sock"
        self.qsd = QSD(work / "qsd", size=SIZE, node="disk0", export_name="disk0", extra_args=[
            "--chardev", f"socket,id=qmp1,path={self.agent_qmp},server=on,wait=off",
            "--monitor", "chardev=qmp1",
            "--chardev", f"socket,id=qmp2,path={self.admin_qmp},server=on,wait=off",
            "--monitor", "chardev=qmp2",
            "--export", "type=nbd,id=src0,node-name=disk0,name=src0,writable=off"]).start()
        self.source = f"nbd+unix:///src0?socket={self.qsd.export_path}"
        self.agent = AgentProc(work, self.hub, self.hub.secret_file, self.agent_qmp,
                               {"disk0": VOL}, mode="sync", extra=["--accept-failback"],
                               sources={"disk0": self.source}).start()
        wait_until(lambda: (self.hub.volume(VOL) or {}).get("state") == "consistent", 60,
                   "the volume consistent at the hub", 0.1)
        self.guest = nbd.NBDClient(str(self.qsd.export_path), "disk0")
        self.model = StreamModel(SIZE)
        self.recoverer: subprocess.Popen | None = None

    def write(self, offset: int, data: bytes) -> None:
        """One guest write, QD1 (sync mode: it returns once the hub has it)."""
        self.guest.write(offset, data)
        self.model.write(offset, data)

    def checkpoint(self, name: str) -> None:
        py("repagent.py", "checkpoint", "--state-dir", str(self.agent.state), name)
        self.model.checkpoint(name)

    def qmp(self, command: str, arguments: dict | None = None, check=True):
        """The operator's QMP command, through ``repagent.py qmp``."""
        argv = ["repagent.py", "qmp", "--qmp", str(self.admin_qmp), command]
        return py(*argv, *([json.dumps(arguments)] if arguments else []), check=check)

    def recover_failover(self, at: str) -> str:
        """``repagent.py recover --failover``; return the NBD socket it serves."""
        self.recoverer, uri = start_recover(f"127.0.0.1:{self.hub.port}", "rec1",
                                            self.rec_secret, VOL, at, "--failover",
                                            self.work / "recover.log")
        assert "socket=" in uri, f"recover printed {uri!r}:\n{self.recover_log()}"
        return uri.split("socket=")[1]

    def recover_log(self) -> str:
        path = self.work / "recover.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def hub_image(self) -> bytes:
        out = self.work / "hub-latest.raw"
        py("rephub.py", "export", "--data", str(self.hub.data), VOL, "--at", "latest",
           "-o", str(out))
        return out.read_bytes()

    def old_disk(self) -> bytes:
        with nbd.NBDClient(str(self.qsd.export_path), "src0") as client:
            return client.read(0, SIZE)

    def close(self) -> None:
        end(self.recoverer)
        self.guest.close()
        self.agent.close()
        self.qsd.kill()
        self.qsd.close()
        self.hub.kill()
        kill_all()


@pytest.fixture
def sites():
    work = short_tmpdir("fbw")
    s = None
    try:
        s = Sites(work)
        yield s
    finally:
        if s is not None:
            s.close()
        else:
            kill_all()


def test_failback_brings_the_recovery_volume_home_with_the_delta_only(sites):
    s = sites
    # 1. Protected: data everywhere (so a full copy would cost far more than the delta).
    for i in range(SIZE // MiB):
        s.write(i * MiB, pattern(0x10 + i, MiB))
    s.checkpoint("good")
    set_aside = Extents()
    for off in (2 * MiB, 9 * MiB + 128 * 1024):          # after "good": set aside
        s.write(off, pattern(0xA1, 128 * 1024))
        set_aside.add(off, 128 * 1024)
    s.checkpoint("bad")
    old_at_bad = s.model.image_at("bad")

    # 2. Fail over at "good"; the recovery VM writes (patterns recorded).
    sock = s.recover_failover("good")
    recovered = bytearray(s.model.image_at("good"))
    recovery = Extents()
    qemu_io(sock, "write -P 0x77 4M 256k", "write -z 12M 64k", "write -P 0x78 12352k 4k",
            export=VOL)
    for off, data in ((4 * MiB, pattern(0x77, 256 * 1024)), (12 * MiB, bytes(65536)),
                      (12352 * 1024, pattern(0x78, 4096))):
        recovered[off:off + len(data)] = data
        recovery.add(off, len(data))

    # 3. The old site writes after the fail-over: the hub refuses them (late writes).
    late = Extents()
    for off in (6 * MiB, 14 * MiB + 64 * 1024):
        s.write(off, pattern(0xEE, 64 * 1024))
        late.add(off, 64 * 1024)
    wait_until(lambda: "ROLE" in s.agent.tail(20000), 20, "the agent logs the ROLE refusal")

    # 4. The old site goes down and comes back; its VM is stopped (export removed).
    s.agent.kill()
    s.guest.close()
    s.qmp("block-export-del", {"id": "exp0"})
    wait_until(lambda: "exp0" not in s.qmp("query-block-exports").stdout, 20,
               "the VM's export gone")
    gone = s.qmp("block-export-del", {"id": "exp0"}, check=False)
    assert gone.returncode == 1 and "exp0" in gone.stderr, gone
    s.agent.start()
    wait_until(lambda: s.agent.vol().get("role") == "demoted", 30, "the agent demoted", 0.1)

    # 5. Fail back.
    out = py("rephub.py", "failback", "--data", str(s.hub.data), VOL, "--to", "agent1",
             "--yes", "--json", timeout=300)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    report = next(r["report"] for r in lines if "report" in r)
    done = lines[-1]["result"]
    delta = recovery.union(set_aside).union(late.chunk_aligned())

    # The late writes were reported before they were overwritten, and are kept.
    assert report["late_writes"]["extents"] == [[a, b - a] for a, b in late.ranges], report
    assert report["late_writes"]["bytes"] == late.bytes
    saved = Path(report["late_writes"]["image"])
    with open(saved, "rb") as f:
        for a, b in late.ranges:
            f.seek(a)
            assert f.read(b - a) == pattern(0xEE, b - a), "late write not kept at the hub"
    assert report["set_aside"]["bytes"] == set_aside.bytes, report

    # 6. The old disk equals the recovery volume; only the delta was sent.
    assert done["outcome"] == "done", done
    assert s.old_disk() == bytes(recovered)
    assert s.hub_image() == bytes(recovered)
    assert delta.bytes <= done["delta_bytes"] <= delta.chunk_aligned().bytes, (done, delta.bytes)
    assert done["sent_bytes"] <= 1.1 * delta.bytes, (done["sent_bytes"], delta.bytes)

    # The recovery agent was closed; the set-aside history is still exportable.
    assert s.recoverer.wait(30) == 0, s.recover_log()
    assert "failed back" in s.recover_log()
    out_bad = s.work / "bad.raw"
    py("rephub.py", "export", "--data", str(s.hub.data), VOL, "--at", "bad", "--set-aside",
       "-o", str(out_bad))
    assert out_bad.read_bytes() == old_at_bad
    pts = py("rephub.py", "points", "--data", str(s.hub.data), VOL, "--json").stdout
    assert "good" in [c["name"] for c in json.loads(pts)["checkpoints"]]

    # 7. Protection resumes from the original site: the VM starts again, writes replicate.
    wait_until(lambda: s.agent.vol().get("role") == "protected", 30, "protection resumed", 0.1)
    assert s.agent.vol()["dirty_bytes"] == 0
    # The VM's export goes above the mirror's filter again: on the node itself
    # its writes would bypass the mirror.
    s.qmp("block-export-add", {"type": "nbd", "id": "exp0", "name": "disk0", "writable": True,
                               "node-name": ra.qemu_names("disk0")[2]})
    s.guest = nbd.NBDClient(str(s.qsd.export_path), "disk0")
    s.model = StreamModel(SIZE)
    s.model.write(0, bytes(recovered))
    for i in range(12):
        s.write((i * 1327 * 4096) % (SIZE - 65536), pattern(0x40 + i, 8192 + 4096 * i))
    want = nbd_sha256(str(s.qsd.export_path), "src0")
    assert want == s.model.sha256_at()
    assert s.hub_image() == s.model.image_at()
    status = s.hub.volume(VOL)
    assert status["state"] == "consistent" and status.get("role", "protected") != "promoted"

"""Recovery end to end (issue 5): points in time, fail-over test, fail-over.

Real processes on loopback: ``qemu-storage-daemon`` with two raw images,
``repagent.py protect`` replicating both nodes (one agent, one stream, sync
mode so a write returns only once the hub has it), ``rephub.py serve``, and
``repagent.py recover`` serving a recovery export that ``qemu-io`` opens.
The workload writes known patterns through QSD's NBD exports one request at
a time, so stream order is known, and records them in ``oracle.StreamGroup``;
checkpoints go through ``repagent.py checkpoint``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nbd
import protocol as p
from oracle import StreamGroup, StreamModel, assert_same_image
from procs import HubProc, end, spawn, start_recover
from qemu_harness import (QSD, MiB, create_image, file_sha256, kill_all, qemu_io,
                          requires_qemu, short_tmpdir, wait_until)

ROOT = Path(__file__).resolve().parent.parent
SIZE = 8 * MiB
VOLS = ("vola", "volb")

pytestmark = requires_qemu


# ---------------------------------------------------------------------------
# The two sites


def py(*argv, check=True, timeout=60) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


class Site:
    """Protected site (QSD + protect agent) and recovery site (hub)."""

    def __init__(self, work: Path):
        self.work = work
        self.data = str(work / "hub")
        self.hub = HubProc(work, agent_ids=("agent1",), data=self.data, agents=work / "agents")
        self.hub.add_agent("rec1", recover_for=("agent1",))
        self.secrets = {agent: str(path) for agent, path in self.hub.secret_files.items()}
        self.hub.start()
        self.image_b = work / "disk1.raw"
        create_image(self.image_b, SIZE)
        self.agent_qmp = work / "agent-qmp.sock"  # the harness keeps QSD's first monitor
        self.qsd = QSD(work / "qsd", size=SIZE, node="disk0", export_name="disk0", extra_args=[
            "--chardev", f"socket,id=qmp1,path={self.agent_qmp},server=on,wait=off",
            "--monitor", "chardev=qmp1",
            "--blockdev", f"driver=file,node-name=disk1-file,filename={self.image_b}",
            "--blockdev", "driver=raw,node-name=disk1,file=disk1-file",
            "--export", "type=nbd,id=exp1,node-name=disk1,name=disk1,writable=on"]).start()
        self.state = short_tmpdir("rcst")
        self.agent_log = work / "agent.log"
        self.agent = spawn(
            ["repagent.py", "protect", "--hub", self.hub_addr, "--agent-id", "agent1",
             "--secret-file", self.secrets["agent1"], "--qmp", str(self.agent_qmp),
             "--node", "disk0=vola", "--node", "disk1=volb", "--state-dir", str(self.state),
             "--mode", "sync", "--log-level", "INFO"], self.agent_log)
        wait_until(self._consistent, 60, "both volumes consistent at the hub", 0.1)
        self.clients = {"vola": nbd.NBDClient(str(self.qsd.export_path), "disk0"),
                        "volb": nbd.NBDClient(str(self.qsd.export_path), "disk1")}
        self.group = StreamGroup({v: StreamModel(SIZE) for v in VOLS})
        self.recoverers: list[subprocess.Popen] = []

    @property
    def hub_addr(self) -> str:
        return f"{self.hub.address[0]}:{self.hub.address[1]}"

    def status(self) -> dict:
        import rephub
        return rephub.control_request(self.data, {"cmd": "status"})

    def _consistent(self) -> bool:
        if self.agent.poll() is not None:
            raise AssertionError(f"agent exited:\n{self.agent_log.read_text()[-3000:]}")
        vols = {v["name"]: v for v in self.status()["volumes"]}
        return all(v in vols and vols[v]["state"] == "consistent" for v in VOLS)

    def write(self, vol: str, offset: int, data: bytes) -> None:
        """One protected write, QD1: returns once the hub has it (sync mode)."""
        self.clients[vol].write(offset, data)
        self.group.volumes[vol].write(offset, data)

    def checkpoint(self, name: str) -> str:
        out = py("repagent.py", "checkpoint", "--state-dir", str(self.state), name).stdout
        self.group.checkpoint(name)
        return out

    def export(self, vol: str, at: str, *extra: str) -> bytes:
        out = self.work / f"export-{vol}.raw"
        py("rephub.py", "export", "--data", self.data, vol, "--at", at, "-o", str(out), *extra)
        return out.read_bytes()

    def recover(self, vol: str, at: str, mode: str, name: str) -> tuple[subprocess.Popen, str]:
        """Start ``repagent.py recover``; return it and the URI it prints once ready."""
        proc, uri = start_recover(self.hub_addr, "rec1", self.secrets["rec1"], vol, at, mode,
                                  self.work / f"recover-{name}.log")
        self.recoverers.append(proc)
        return proc, uri

    def close(self) -> None:
        for proc in self.recoverers:
            end(proc)
        for c in getattr(self, "clients", {}).values():
            c.close()
        end(getattr(self, "agent", None))
        self.qsd.kill()  # no clean quit needed: a quit waits out the mirror's reconnect-delay
        self.qsd.close()
        self.hub.kill()
        kill_all()


@pytest.fixture
def site():
    work = short_tmpdir("rcw")
    s = None
    try:
        s = Site(work)
        yield s
    finally:
        if s is not None:
            s.close()
        else:
            kill_all()


def pattern(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


def data_dir_holds(data_dir: str, needle: bytes) -> list[str]:
    """Files under the hub's data directory that contain ``needle``."""
    found = []
    for root, _, files in os.walk(data_dir):
        for f in files:
            path = os.path.join(root, f)
            try:
                with open(path, "rb") as fh:
                    if needle in fh.read():
                        found.append(path)
            except OSError:
                pass
    return found


# ---------------------------------------------------------------------------
# Tests


def test_exports_match_the_stream_at_every_point(site):
    """Checkpoints (through the agent) and time stamps between phases: ``export``
    equals the oracle's image of that stream prefix, on both volumes at once."""
    times = []
    for phase in range(3):
        for i in range(6):
            vol = VOLS[i % 2]
            off = ((phase * 7 + i * 3) % 30) * 256 * 1024
            site.write(vol, off, pattern(0x10 * (phase + 1) + i, 64 * 1024 * (1 + i % 3)))
        assert "ACK" in site.checkpoint(f"cp{phase}")
        site.clients["volb"].write_zeroes(0, 128 * 1024)  # a ZERO record too
        site.group.volumes["volb"].zero(0, 128 * 1024)
        times.append(time.time_ns())
    site.write("vola", 5 * MiB, pattern(0xEE, 4096))  # after the last time stamp
    pts = json.loads(py("rephub.py", "points", "--data", site.data, "vola", "--json").stdout)
    assert [c["name"] for c in pts["checkpoints"]] == ["cp0", "cp1", "cp2"]
    for vol in VOLS:
        model = site.group.volumes[vol]
        for name in ("cp0", "cp1", "cp2"):
            assert site.export(vol, name) == model.image_at(name), f"{vol} at {name}"
        for t in times[:2]:
            assert site.export(vol, p.format_point_time(t)) == model.image_at(model.prefix_at_time(t)), \
                f"{vol} at {p.format_point_time(t)}"
        assert site.export(vol, "latest") == model.image_at()


def test_failover_test_leaves_no_trace(site):
    """``recover --test``: qemu-io reads the checkpoint's data and writes its own
    while the protected workload keeps replicating; two volumes tested at once;
    after close the replica equals the source and no test write is in the store."""
    site.write("vola", 0, pattern(0x11, MiB))
    site.write("volb", 0, pattern(0x12, MiB))
    site.checkpoint("before-test")
    site.write("vola", 0, pattern(0x22, 512 * 1024))      # newer than the point
    proc_a, uri_a = site.recover("vola", "before-test", "--test", "ta")
    proc_b, uri_b = site.recover("volb", "latest", "--test", "tb")
    assert uri_a.startswith("nbd+unix:///vola?socket="), uri_a
    assert uri_b.startswith("nbd+unix:///volb?socket="), uri_b
    sock_a, sock_b = uri_a.split("socket=")[1], uri_b.split("socket=")[1]
    status = py("rephub.py", "status", "--data", site.data).stdout
    assert "recovery: TEST session of vola at before-test" in status, status
    busy, _ = site.recover("vola", "latest", "--test", "busy")  # one session per volume
    assert busy.wait(30) == 1
    assert "BUSY" in (site.work / "recover-busy.log").read_text()

    qemu_io(sock_a, "read -P 0x11 0 1M", "write -P 0x5a 2M 1M", "read -P 0x5a 2M 1M",
            "write -z 0 64k", "read -P 0 0 64k", "read -P 0x11 64k 960k", export="vola")
    qemu_io(sock_b, "read -P 0x12 0 1M", "write -P 0x5b 3M 512k", "read -P 0x5b 3M 512k",
            export="volb")
    for i in range(8):  # replication carries on meanwhile
        site.write("vola", 4 * MiB + i * 65536, pattern(0x33, 65536))
    qemu_io(sock_a, "read -P 0x11 512k 512k", "read -P 0 4M 512k", export="vola")

    assert end(proc_a, signal.SIGTERM) == 0 and end(proc_b, signal.SIGTERM) == 0
    for vol, image in (("vola", site.qsd.image), ("volb", site.image_b)):
        replica = Path(site.data) / "volumes" / vol / "replica"
        want = file_sha256(image)
        wait_until(lambda: file_sha256(replica) == want, 30, f"{vol} replica == source", 0.2)
        assert site.export(vol, "latest") == site.group.volumes[vol].image_at()
    for needle in (pattern(0x5a, 4096), pattern(0x5b, 4096)):
        assert data_dir_holds(site.data, needle) == [], "a test write reached the store"
    assert not os.listdir(os.path.join(site.data, "scratch"))
    log = site.hub.read_log()
    assert "overlay discarded" in log


def test_failover_promotes_and_fences_the_protected_side(site):
    """``recover --failover``: the point's data, newer entries set aside (still
    exportable), the protected agent's next write refused while QEMU goes on,
    recovery writes durable across a hub SIGKILL; ``promote`` CLI for volb."""
    site.write("vola", 0, pattern(0x11, MiB))
    site.write("volb", 0, pattern(0x12, MiB))
    site.checkpoint("good")
    site.write("vola", 0, pattern(0x22, 256 * 1024))      # to be set aside
    site.checkpoint("bad")
    proc, uri = site.recover("vola", "good", "--failover", "fo")
    sock = uri.split("socket=")[1]
    qemu_io(sock, "read -P 0x11 0 1M", "write -P 0x77 3M 1M", "write -z 1M 64k",
            "read -P 0x77 3M 1M", export="vola")

    # The protected side writes again: refused by the hub, QEMU is answered anyway.
    site.clients["vola"].write(6 * MiB, pattern(0x44, 65536))
    wait_until(lambda: "ROLE" in site.agent_log.read_text(), 20, "the agent logs ROLE")
    assert site.agent.poll() is None and site.qsd.proc.poll() is None

    out = py("rephub.py", "points", "--data", site.data, "vola").stdout
    assert "promoted at good" in out and "set aside" in out, out
    pts = json.loads(py("rephub.py", "points", "--data", site.data, "vola", "--json").stdout)
    assert [c["name"] for c in pts["checkpoints"]] == ["good"]
    assert [c["name"] for c in pts["unrecoverable"]] == ["bad"]

    assert end(proc, signal.SIGTERM) == 0
    site.hub.kill(signal.SIGKILL)
    site.hub = HubProc(site.work, data=site.data, agents=site.hub.agents, log=site.hub.log).start()
    expected = bytearray(site.group.volumes["vola"].image_at("good"))
    expected[3 * MiB:4 * MiB] = pattern(0x77, MiB)
    expected[MiB:MiB + 65536] = bytes(65536)
    assert site.export("vola", "latest") == bytes(expected)
    assert site.export("vola", "bad", "--set-aside") == \
        site.group.volumes["vola"].image_at("bad"), "set-aside entries stay exportable"
    bad = py("rephub.py", "export", "--data", site.data, "vola", "--at", "bad", "-o",
             str(site.work / "x.raw"), check=False)
    assert bad.returncode != 0 and "set aside" in bad.stderr + bad.stdout

    # Promotion without a recovery agent, through the running hub.
    out = py("rephub.py", "promote", "--data", site.data, "volb", "--at", "good").stdout
    assert "promoted volb" in out
    assert_same_image(str(Path(site.data) / "volumes" / "volb" / "replica"),
                      site.group.volumes["volb"].image_at("good"))

"""The mutation fuzzer, bounded for CI (``make fuzz N=100000`` is the long run).

tests/faults/fuzz.py sends >= 10 000 mutated frames to rephub, to repagent's
hub-facing side and to repagent's NBD server; any crash, hang, traceback,
changed byte outside the targeted volume or out-of-range frame fails the run.
"""

from __future__ import annotations

import os
import random
import socket
import time

import nbd
import protocol as p
from faults import fuzz
from qemu_harness import MemoryHandler, requires_qemu, short_tmpdir


def test_mutations_are_seeded_and_each_kind_is_drawn():
    frame = p.encode(p.Write(request_id=1, volume=1, offset=4096, data=b"a" * 4096))
    wrong = fuzz.hub_wrong_phase()
    runs = [[fuzz.mutate(random.Random(9), frame, wrong) for _ in range(1)]
            for _ in range(2)]
    assert runs[0] == runs[1]
    rng = random.Random(5)
    kinds = {fuzz.mutate(rng, frame, wrong)[0] for _ in range(500)}
    assert kinds == set(fuzz.MUTATIONS)
    calm = {fuzz.mutate(rng, frame, wrong, may_end=False)[0] for _ in range(500)}
    assert not calm & fuzz.ENDING


def test_nbd_write_cut_inside_its_payload_closes_at_once(tmp_path):
    """A client that disconnects inside a WRITE payload owes no reply: the
    server closes at once instead of waiting DRAIN_TIMEOUT for it."""
    path = str(short_tmpdir("nbdf") / "s.sock")
    with nbd.NBDServer(path, "vol0", 1 << 20, MemoryHandler(1 << 20)) as srv:
        client = nbd.NBDClient(path, "vol0", timeout=10)
        sock = client._sock
        sock.sendall(nbd.REQUEST_HEADER.pack(nbd.REQUEST_MAGIC, 0, 1, 7, 0, 1 << 20)
                     + b"x" * 65536)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(15)
        start = time.monotonic()
        while sock.recv(65536):
            pass
        assert time.monotonic() - start < 2
        sock.close()
        assert srv.connection_count == 0 or time.monotonic() - start < 2


@requires_qemu
def test_ten_thousand_mutated_frames_break_nothing(tmp_path):
    seed = int(os.environ.get("FUZZ_SEED", "20261125"))
    stats = fuzz.run(10_000, seed, time_limit=120, workdir=tmp_path)
    assert stats["frames"] >= 10_000, f"only {stats['frames']} frames in the time limit"
    assert stats["hub"] and stats["agent"] and stats["nbd"]

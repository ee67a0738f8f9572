"""The recovery export's read-ahead (repagent.RecoveryHandler).

A fake RecoveryClient stands in for the hub: it serves each request at once,
in the order sent, as a hub serves one connection (an RREAD reads the image
as it is, an RWRITE changes it), but holds each answer until the test lets
it go, in any order.  So every interleaving of reads ahead, client reads and
writes the export can see is one a test can make.  The rule under test: a
client read that comes while no write is in flight gets the image as it is
then, whatever was read ahead before.
"""

from __future__ import annotations

import errno
import random

import protocol as p
import repagent as ra

MiB = 1024 * 1024
PIECE = 64 * 1024


class FakeClient:
    """``request`` as RecoveryClient's: the hub's side done at once, the answer held."""

    def __init__(self, size: int):
        self.size = size
        self.session = 7
        self.image = bytearray(size)
        self.held: list[tuple] = []          # (message, reply, answer)
        self.sent: list[p.Message] = []
        self.fail_reads: set[int] = set()    # offsets whose next RREAD fails

    def request(self, make, reply, length=0):
        msg = make(len(self.sent) + 1)
        self.sent.append(msg)
        if isinstance(msg, p.RRead):
            if msg.offset in self.fail_reads:
                self.fail_reads.discard(msg.offset)
                answer = (errno.EIO,)
            else:
                answer = (0, bytes(self.image[msg.offset:msg.offset + msg.length]))
        else:
            data = bytes(msg.length) if msg.flags & p.FLAG_ZERO else bytes(msg.data)
            self.image[msg.offset:msg.offset + msg.length] = data
            answer = (0,)
        self.held.append((msg, reply, answer))

    def answer(self, i: int = 0) -> None:
        _, reply, answer = self.held.pop(i)
        reply(*answer)

    def answer_all(self) -> None:
        while self.held:
            self.answer()

    def reads(self) -> list[int]:
        return [m.offset for m in self.sent if isinstance(m, p.RRead)]


class Result:
    """A client read's reply, once it came."""

    def __init__(self):
        self.got = None

    def __call__(self, err, data=None):
        assert self.got is None, "answered twice"
        self.got = (err, None if data is None else bytes(data))


def test_sequential_reads_are_read_ahead_and_answered_from_it():
    client = FakeClient(16 * PIECE)
    client.image[:] = random.Random(1).randbytes(client.size)
    handler = ra.RecoveryHandler(client)
    results = []
    for i in range(8):
        r = Result()
        handler.read(i * PIECE, PIECE, r)
        client.answer_all()
        results.append(r)
    for i, r in enumerate(results):
        assert r.got == (0, bytes(client.image[i * PIECE:(i + 1) * PIECE])), i
    # The first two reads are asked for; from the second on, two ahead of each.
    assert client.reads() == [0, PIECE, 2 * PIECE, 3 * PIECE, *[k * PIECE for k in range(4, 10)]]
    assert len(client.reads()) == 10, "each piece asked for once"


def test_a_read_waiting_for_its_read_ahead_gets_it_when_it_comes():
    client = FakeClient(8 * PIECE)
    client.image[:] = random.Random(2).randbytes(client.size)
    handler = ra.RecoveryHandler(client)
    for i in range(2):
        handler.read(i * PIECE, PIECE, Result())
    waiting = Result()
    handler.read(2 * PIECE, PIECE, waiting)       # its read ahead is not answered yet
    assert waiting.got is None and client.reads().count(2 * PIECE) == 1
    client.answer_all()
    assert waiting.got == (0, bytes(client.image[2 * PIECE:3 * PIECE]))


def test_a_write_drops_the_reads_ahead_it_overlaps():
    client = FakeClient(8 * PIECE)
    handler = ra.RecoveryHandler(client)
    handler.read(0, PIECE, Result())
    handler.read(PIECE, PIECE, Result())          # reads 2 and 3 ahead, with zeroes
    client.answer_all()
    handler.write(2 * PIECE + 100, memoryview(b"x" * 10), Result())
    client.answer_all()
    r = Result()
    handler.read(2 * PIECE, PIECE, r)
    client.answer_all()
    assert r.got[1][100:110] == b"x" * 10, "the write is seen, not the bytes read ahead"
    assert client.reads().count(2 * PIECE) == 2


def test_nothing_is_read_ahead_while_a_write_is_in_flight():
    client = FakeClient(8 * PIECE)
    handler = ra.RecoveryHandler(client)
    handler.read(0, PIECE, Result())
    client.answer_all()
    handler.write_zeroes(5 * PIECE, PIECE, Result())  # not answered yet
    handler.read(PIECE, PIECE, Result())
    assert client.reads() == [0, PIECE], "a read ahead now might miss the write"
    client.answer_all()
    handler.read(2 * PIECE, PIECE, Result())
    assert client.reads() == [0, PIECE, 2 * PIECE, 3 * PIECE, 4 * PIECE]


def test_a_read_ahead_that_failed_is_asked_again_for_the_client():
    client = FakeClient(8 * PIECE)
    client.image[:] = random.Random(3).randbytes(client.size)
    handler = ra.RecoveryHandler(client)
    client.fail_reads = {2 * PIECE, 3 * PIECE}
    handler.read(0, PIECE, Result())
    handler.read(PIECE, PIECE, Result())           # reads ahead at 2 and 3, held
    waiting = Result()
    handler.read(2 * PIECE, PIECE, waiting)        # waits for the one at 2
    client.answer_all()                            # both fail; 2 is asked again
    assert waiting.got == (0, bytes(client.image[2 * PIECE:3 * PIECE]))
    late = Result()
    handler.read(3 * PIECE, PIECE, late)           # the one at 3 failed before: read anew
    client.answer_all()
    assert late.got == (0, bytes(client.image[3 * PIECE:4 * PIECE]))
    assert client.reads().count(2 * PIECE) == 2 and client.reads().count(3 * PIECE) == 2


def test_reads_ahead_stop_at_the_end_and_are_not_kept_past_a_jump():
    client = FakeClient(4 * PIECE)
    handler = ra.RecoveryHandler(client)
    handler.read(2 * PIECE, PIECE, Result())
    handler.read(3 * PIECE, PIECE, Result())       # sequential, but nothing after it
    assert client.reads() == [2 * PIECE, 3 * PIECE]
    handler.read(0, PIECE, Result())
    handler.read(PIECE, PIECE, Result())
    handler.read(3 * PIECE, PIECE, Result())       # a jump: the read ahead at 2 goes
    assert handler.ahead == {}
    big = ra.READ_AHEAD_MAX * 2
    client = FakeClient(4 * big)
    handler = ra.RecoveryHandler(client)
    handler.read(0, big, Result())
    handler.read(big, big, Result())
    assert client.reads() == [0, big], "long reads are not read ahead"


def test_random_reads_and_writes_never_see_a_stale_read_ahead():
    """Sequential runs of reads, writes anywhere, answers let go out of order:
    every read that came with no write in flight gets the image as
    it was when it came."""
    hits = 0
    for seed in range(20):
        rng = random.Random(seed)
        size = 32 * PIECE
        client = FakeClient(size)
        client.image[:] = rng.randbytes(size)
        handler = ra.RecoveryHandler(client)
        checks = []
        pos = 0
        writes_open = []
        for _ in range(600):
            r = rng.random()
            if r < 0.45:
                length = rng.choice((PIECE, 2 * PIECE))
                if rng.random() < 0.15 or pos + length > size:
                    pos = rng.randrange(0, size - length + 1, 4096)
                res = Result()
                if not any(w.got is None for w in writes_open):
                    checks.append((res, bytes(client.image[pos:pos + length])))
                handler.read(pos, length, res)
                hits += res.got is not None     # answered by a read ahead already here
                pos += length
            elif r < 0.53:
                off = rng.randrange(0, size - 1)
                n = rng.randrange(1, min(3 * PIECE, size - off) + 1)
                res = Result()
                writes_open.append(res)
                if rng.random() < 0.3:
                    handler.write_zeroes(off, n, res)
                else:
                    handler.write(off, memoryview(rng.randbytes(n)), res)
            else:                               # mostly in order, as a hub answers
                for _ in range(min(rng.randrange(1, 5), len(client.held))):
                    client.answer(rng.randrange(min(4, len(client.held))))
        client.answer_all()
        assert len(checks) > 30, seed
        assert all(res.got == (0, want) for res, want in checks), seed
        assert all(w.got == (0, None) for w in writes_open)
    assert hits > 100, "the reads ahead were used"

"""The replica-state oracle: what the hub must hold at every point of the stream.

A workload that writes through QSD one request at a time (each write
acknowledged before the next is issued) knows the exact order in which its
writes enter the replication stream.  ``StreamModel`` records that order,
with named checkpoints and wall-clock stamps between writes, and answers
"what is the image after exactly this prefix of the stream?".  The recovery
and fault tests compare the hub's exports against it:

    model = StreamModel(size)
    model.write(0, b"a" * 4096)
    model.checkpoint("before-upgrade")
    ...
    assert_same_image(exported_path, model.image_at("before-upgrade"))

Several volumes of one agent share one stream: give each its own model and
record checkpoints in all of them (``StreamGroup``), since a checkpoint
covers every volume of the agent.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field


@dataclass
class _Op:
    offset: int
    data: bytes | None   # None: zeroes
    length: int
    time_ns: int


@dataclass
class StreamModel:
    """Writes of one volume, in stream order, with points between them."""

    size: int
    base: bytes | None = None  # the volume's content before the first write
    ops: list[_Op] = field(default_factory=list)
    points: dict[str, int] = field(default_factory=dict)  # name -> ops prefix length

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        self.ops.append(_Op(offset, bytes(data), len(data), time.time_ns()))

    def zero(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self.ops.append(_Op(offset, None, length, time.time_ns()))

    def checkpoint(self, name: str) -> None:
        """Mark the current end of the stream with ``name``."""
        self.points[name] = len(self.ops)

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise ValueError(f"write offset {offset} length {length} outside a "
                             f"volume of {self.size} bytes")

    def prefix_at_time(self, time_ns: int) -> int:
        """How many writes had entered the stream at ``time_ns`` (newest not after)."""
        return sum(1 for op in self.ops if op.time_ns <= time_ns)

    def image_at(self, point: str | int | None = None) -> bytes:
        """The image after a prefix: a checkpoint name, a prefix length, or
        None for the whole stream."""
        if point is None:
            count = len(self.ops)
        elif isinstance(point, str):
            count = self.points[point]
        else:
            count = point
        image = bytearray(self.base if self.base is not None else bytes(self.size))
        for op in self.ops[:count]:
            end = op.offset + op.length
            image[op.offset:end] = op.data if op.data is not None else bytes(op.length)
        return bytes(image)

    def sha256_at(self, point: str | int | None = None) -> str:
        return hashlib.sha256(self.image_at(point)).hexdigest()


@dataclass
class StreamGroup:
    """The models of all volumes one agent replicates: one stream, one set of points."""

    volumes: dict[str, StreamModel]

    def checkpoint(self, name: str) -> None:
        for model in self.volumes.values():
            model.checkpoint(name)


def first_difference(actual: bytes, expected: bytes, chunk: int = 4096) -> str | None:
    """Describe the first differing chunk, or None when the images are equal."""
    if len(actual) != len(expected):
        return f"sizes differ: {len(actual)} != {len(expected)}"
    for offset in range(0, len(expected), chunk):
        if actual[offset:offset + chunk] != expected[offset:offset + chunk]:
            return (f"first difference in the {chunk}-byte chunk at offset {offset}: "
                    f"got {actual[offset:offset + 16].hex()}..., "
                    f"expected {expected[offset:offset + 16].hex()}...")
    return None


def assert_same_image(path: str, expected: bytes) -> None:
    """Fail with the first differing chunk if the file's bytes differ."""
    with open(path, "rb") as f:
        actual = f.read()
    problem = first_difference(actual, expected)
    if problem:
        raise AssertionError(f"{path}: {problem}")


def rebase(model: StreamModel) -> None:
    """Fold every recorded write into ``model.base`` and forget them (and the
    points): a long run (tests/faults/soak.py) keeps memory bounded this way,
    keeping the sha256 of each point it still wants to check."""
    model.base = model.image_at()
    model.ops.clear()
    model.points.clear()

"""The replica-state oracle answers prefixes of the stream correctly."""

import pytest

from oracle import StreamGroup, StreamModel, assert_same_image, first_difference


def test_prefixes_checkpoints_and_zeroes():
    model = StreamModel(16)
    model.write(0, b"aaaa")
    model.checkpoint("one")
    model.write(2, b"bbbb")
    model.zero(0, 3)
    assert model.image_at(0) == bytes(16)
    assert model.image_at("one") == b"aaaa" + bytes(12)
    assert model.image_at(2) == b"aabbbb" + bytes(10)
    assert model.image_at() == bytes(3) + b"bbb" + bytes(10)


def test_checkpoint_covers_every_volume_of_the_group():
    group = StreamGroup({"a": StreamModel(8), "b": StreamModel(8)})
    group.volumes["a"].write(0, b"x")
    group.checkpoint("cp")
    group.volumes["b"].write(0, b"y")
    assert group.volumes["a"].image_at("cp")[:1] == b"x"
    assert group.volumes["b"].image_at("cp") == bytes(8)


def test_timestamps_select_the_newest_prefix_not_after_them():
    model = StreamModel(8)
    model.write(0, b"1")
    stamp = model.ops[-1].time_ns
    model.write(0, b"2")
    model.ops[-1].time_ns = stamp + 10
    assert model.prefix_at_time(stamp) == 1
    assert model.prefix_at_time(stamp + 10) == 2


def test_writes_outside_the_volume_are_refused():
    with pytest.raises(ValueError, match="outside a volume of 8 bytes"):
        StreamModel(8).write(6, b"abc")


def test_difference_report_names_the_chunk(tmp_path):
    expected = bytes(8192)
    actual = bytes(4096) + b"\x01" + bytes(4095)
    assert "offset 4096" in first_difference(actual, expected)
    path = tmp_path / "img"
    path.write_bytes(actual)
    with pytest.raises(AssertionError, match="offset 4096"):
        assert_same_image(str(path), expected)
    path.write_bytes(expected)
    assert_same_image(str(path), expected)

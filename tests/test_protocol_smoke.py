"""First checks of the codec: every message type survives a round trip."""

import protocol as p


def test_write_round_trip_keeps_every_field():
    msg = p.Write(request_id=7, volume=1, offset=4096, data=b"x" * 10)
    back = p.decode(p.encode(msg))
    assert back.fields() == msg.fields()
    assert bytes(back.data) == b"x" * 10


def test_bad_magic_names_both_values():
    frame = bytearray(p.encode(p.Ack(request_id=1)))
    frame[0] ^= 0xFF
    try:
        p.decode(frame)
    except p.BadMagic as err:
        assert "0xad504c31" in str(err) and "0x52504c31" in str(err)
    else:
        raise AssertionError("bad magic accepted")

"""The codecs against the golden vectors, and against each other.

The codec under test is the one the suite's peers use (``--independent-codec``
picks the one written from PROTOCOL.md's tables).  Every valid vector must
encode to its exact bytes with both codecs, and decode back to its fields;
every malformed vector must be rejected with the vector's action and code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import cf_codec
from cf_codec import Msg, WireError, decode_frame

clause = pytest.mark.clause
VECTORS = Path(__file__).resolve().parents[1] / "vectors"


def _valid():
    out = []
    for name in ("messages.json", "handshake.json"):
        for v in json.loads((VECTORS / name).read_text())["vectors"]:
            out.append(pytest.param(v, id=f"{name[:-5]}:{v['name']}"))
    return out


def _malformed():
    out = []
    for path in sorted(VECTORS.glob("malformed*.json")):
        for v in json.loads(path.read_text())["vectors"]:
            out.append(pytest.param(v, id=f"{path.stem}:{v['name']}",
                                    marks=pytest.mark.clause(*cf_codec.vector_clauses(v))))
    return out


def to_msg(v: dict) -> Msg:
    f = dict(v["fields"])
    head = {k: f.pop(k) for k in ("request_id", "volume", "offset", "length", "flags")}
    for k in ("data", "nonce", "proof", "generation"):
        if k in f:
            f[k] = bytes.fromhex(f[k])
    if "digests" in f:
        f["digests"] = [bytes.fromhex(d) for d in f["digests"]]
    if "extents" in f:
        f["extents"] = [tuple(e) for e in f["extents"]]
    return Msg(v["type"], **head, fields=f)


def normal(m: Msg) -> dict:
    out = {"type": m.type, "request_id": m.request_id, "volume": m.volume,
           "offset": m.offset, "length": m.length, "flags": m.flags}
    for k, value in m.fields.items():
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = bytes(value).hex()
        elif isinstance(value, list):
            value = [bytes(x).hex() if isinstance(x, (bytes, memoryview)) else list(x)
                     for x in value]
        elif isinstance(value, str) and k in cf_codec.ENUMS:
            value = cf_codec.ENUMS[k][value]
        elif isinstance(value, int):
            value = int(value)
        out[k] = value
    return out


@clause("FR-1", "FR-15", "VN-2")
@pytest.mark.parametrize("vector", _valid())
def test_both_codecs_encode_identical_bytes(vector):
    """The spec's tables (independent codec) and protocol.py agree byte for byte."""
    m = to_msg(vector)
    ref = cf_codec.ReferenceCodec().encode(m)
    ind = cf_codec.IndependentCodec().encode(m)
    assert ind == ref, f"{vector['name']}: the codecs disagree"
    assert ref.hex() == vector["hex"]


@clause("FR-1", "FR-4", "FR-6", "FR-14")
@pytest.mark.parametrize("vector", _valid())
def test_codec_decodes_valid_vector(codec, vector):
    got = normal(decode_frame(codec, bytes.fromhex(vector["hex"])))
    want = normal(to_msg(vector))
    assert got == want


@pytest.mark.parametrize("vector", _malformed())
def test_codec_rejects_malformed_vector(codec, vector):
    with pytest.raises(WireError) as info:
        decode_frame(codec, bytes.fromhex(vector["hex"]))
    err = info.value
    # "drop" is a request error whose answer [ER-3] forbids: the codec's part
    # (consume the frame, name the code) is the same as for "answer".  So is
    # a handshake-phase request error: the receiver, not the codec, closes [HS-12].
    want = "answer" if vector["action"] == "drop" else vector["action"]
    if vector["phase"] == "handshake":
        want = "answer"
    assert err.action == want, f"{vector['name']}: {err}"
    if err.action == "answer":
        assert err.code == vector["code"], str(err)
    if vector["phase"] == "established" and err.action == "answer":
        assert err.request_id == vector["request_id"], str(err)


@clause("FR-4")
def test_header_crc_covers_every_header_byte(codec):
    """Flipping any bit of header bytes 0..43 (after magic and version) is caught."""
    frame = bytearray(bytes.fromhex(json.loads((VECTORS / "messages.json").read_text())
                                    ["vectors"][0]["hex"]))
    for pos in range(5, 44):
        for bit in (0, 7):
            bad = bytearray(frame)
            bad[pos] ^= 1 << bit
            with pytest.raises(WireError) as info:
                decode_frame(codec, bytes(bad))
            assert info.value.action == "close", f"byte {pos} bit {bit}: {info.value}"


@clause("HS-5")
def test_handshake_vector_proofs():
    """The transcript and proofs of handshake.json, rebuilt from the spec's table."""
    from cf_peers import AGENT_LABEL, HUB_LABEL, proof, transcript
    doc = json.loads((VECTORS / "handshake.json").read_text())
    secret = bytes.fromhex(doc["secret"])
    args = (bytes.fromhex(doc["agent_nonce"]), bytes.fromhex(doc["hub_nonce"]),
            doc["agent_id"], doc["hub_id"])
    assert transcript(HUB_LABEL, *args).hex() == doc["hub_transcript"]
    assert transcript(AGENT_LABEL, *args).hex() == doc["agent_transcript"]
    assert proof(secret, HUB_LABEL, *args).hex() == doc["hub_proof"]
    assert proof(secret, AGENT_LABEL, *args).hex() == doc["agent_proof"]


@pytest.mark.parametrize("vector", _malformed())
def test_both_codecs_reject_alike(vector):
    """The spec's tables and protocol.py reject each malformed frame the same way."""
    outcomes = []
    for c in (cf_codec.ReferenceCodec(), cf_codec.IndependentCodec()):
        with pytest.raises(WireError) as info:
            decode_frame(c, bytes.fromhex(vector["hex"]))
        e = info.value
        outcomes.append((e.action, e.code if e.action == "answer" else None,
                         e.request_id if e.action == "answer" else None))
    assert outcomes[0] == outcomes[1]

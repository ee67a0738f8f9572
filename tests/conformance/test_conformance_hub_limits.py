"""Hub direction: what an unauthenticated peer may make the hub do (PROTOCOL.md
"Security considerations", "Limits").

Before AUTH_OK no frame may carry more than MAX_HANDSHAKE_PAYLOAD [SE-3]: the
suite sends only the header of such a frame and expects ERROR(PROTOCOL) and
the close without sending a byte of the payload, so a hub that waited for
(or allocated) the declared payload fails by timing out.
"""

from __future__ import annotations

import secrets

import pytest

from cf_codec import CODE_NAMES, TYPE_VALUES, Msg, msg, raw_frame
from cf_peers import Conn, handshake_agent

clause = pytest.mark.clause
T = 10.0
#: PROTOCOL.md "Limits": MAX_HANDSHAKE_PAYLOAD and MAX_DATA, as the spec states them.
MAX_HANDSHAKE_PAYLOAD = 1031
MAX_DATA = 32 * 1024 * 1024


def hello(hub) -> Msg:
    return msg("HELLO", nonce=secrets.token_bytes(32), agent_id=hub.agent_id,
               min_version=1, max_version=1, features=0)


def codes(frames) -> list[str]:
    return [CODE_NAMES.get(int(f.code), str(f.code)) for f in frames
            if isinstance(f, Msg) and f.type == "ERROR"]


@clause("SE-3", "ER-1")
@pytest.mark.parametrize("when", ["hello", "auth"])
@pytest.mark.parametrize("declared", [MAX_HANDSHAKE_PAYLOAD + 1, MAX_DATA])
def test_oversized_payload_before_auth_ok_is_refused_unread(hub, codec, when, declared):
    """Only the header is sent: the hub refuses it without waiting for the payload."""
    conn = Conn.connect(hub.address, codec)
    try:
        if when == "auth":
            conn.send(hello(hub))
            assert conn.recv(T).type == "HELLO_REPLY"
        conn.send_raw(raw_frame(TYPE_VALUES[when.upper()], payload_length=declared,
                                payload_crc=0))
        frames = conn.recv_until_close(T)
        assert codes(frames) == ["PROTOCOL"], frames
    finally:
        conn.close()
    a = Conn.connect(hub.address, codec)
    try:
        handshake_agent(a, hub.agent_id, hub.secret)   # the hub still serves others
    finally:
        a.close()


@clause("SE-3", "ER-3")
def test_a_handshake_error_of_max_handshake_payload_is_accepted(hub, codec):
    """An ERROR with a MAX_TEXT message (exactly MAX_HANDSHAKE_PAYLOAD) before
    AUTH_OK ends the handshake, and is not itself answered with ERROR [ER-3]."""
    conn = Conn.connect(hub.address, codec)
    try:
        conn.send(hello(hub))
        assert conn.recv(T).type == "HELLO_REPLY"
        protocol_code = {name: code for code, name in CODE_NAMES.items()}["PROTOCOL"]
        err = msg("ERROR", code=protocol_code, failed_type=TYPE_VALUES["HELLO_REPLY"],
                  message="x" * 1024)
        raw = codec.encode(err)
        assert len(raw) - 48 == MAX_HANDSHAKE_PAYLOAD
        conn.send_raw(raw)
        frames = conn.recv_until_close(T)
        assert codes(frames) == [], frames
    finally:
        conn.close()

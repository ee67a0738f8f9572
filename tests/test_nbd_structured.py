"""nbd.NBDClient with structured replies and block status, against a scripted server.

QEMU's server is exercised in test_agent_extents.py; here a small server
plays the handshake (STRUCTURED_REPLY, SET_META_CONTEXT base:allocation, GO)
and answers each request with the chunks a test scripts, so that the
client's reassembly and its handling of bad or unusual chunks are pinned
down: chunks out of order, holes, error chunks (the connection goes on),
other metadata contexts, descriptors running past the request, and chunks a
server must not send (the client closes).
"""

from __future__ import annotations

import socket
import struct
import threading

import pytest

import nbd
from qemu_harness import short_tmpdir

SIZE = 1 << 20
CONTEXT = 7


def chunk(handle: int, kind: int, payload: bytes = b"", done: bool = False) -> bytes:
    return struct.pack("!IHHQI", nbd.STRUCTURED_REPLY_MAGIC, nbd.ReplyFlag.DONE if done else 0,
                       kind, handle, len(payload)) + payload


def data_chunk(handle, offset, data, done=False):
    return chunk(handle, nbd.ReplyType.OFFSET_DATA, struct.pack("!Q", offset) + data, done)


def hole_chunk(handle, offset, length, done=False):
    return chunk(handle, nbd.ReplyType.OFFSET_HOLE, struct.pack("!QI", offset, length), done)


def error_chunk(handle, error, message=b"", done=True):
    return chunk(handle, nbd.ReplyType.ERROR, struct.pack("!IH", error, len(message)) + message,
                 done)


def status_chunk(handle, context, descriptors, done=False):
    body = struct.pack("!I", context) + b"".join(struct.pack("!II", n, f)
                                                 for n, f in descriptors)
    return chunk(handle, nbd.ReplyType.BLOCK_STATUS, body, done)


def none_chunk(handle):
    return chunk(handle, nbd.ReplyType.NONE, done=True)


class ScriptedServer:
    """One connection: the handshake, then ``script(command, handle, offset,
    length) -> bytes`` answers each request until the client disconnects."""

    def __init__(self, script):
        self.dir = short_tmpdir("nbds")
        self.path = str(self.dir / "s.sock")
        self.script = script
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.settimeout(10)
        self.thread = threading.Thread(target=self.run, name="scripted-nbd", daemon=True)
        self.thread.start()

    def run(self):
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        with sock:
            sock.settimeout(10)
            try:
                self.serve(sock)
            except (OSError, nbd.NBDError):
                pass

    def option_reply(self, sock, option, reply, data=b""):
        sock.sendall(nbd.OPTION_REPLY_HEADER.pack(nbd.OPTION_REPLY_MAGIC, option, reply,
                                                  len(data)) + data)

    def serve(self, sock):
        sock.sendall(nbd.SERVER_GREETING.pack(nbd.NBDMAGIC, nbd.IHAVEOPT,
                                              nbd.SERVER_HANDSHAKE_FLAGS))
        nbd.recv_exactly(sock, 4, "client flags")
        while True:
            _, option, length = nbd.OPTION_HEADER.unpack(
                nbd.recv_exactly(sock, nbd.OPTION_HEADER.size, "option"))
            nbd.recv_exactly(sock, length, "option data")
            if option == nbd.Option.SET_META_CONTEXT:
                self.option_reply(sock, option, nbd.OptionReply.META_CONTEXT,
                                  struct.pack("!I", CONTEXT) + b"base:allocation")
            if option == nbd.Option.GO:
                self.option_reply(sock, option, nbd.OptionReply.INFO,
                                  nbd.INFO_EXPORT.pack(nbd.Info.EXPORT, SIZE,
                                                       nbd.SERVER_TRANSMISSION_FLAGS))
            self.option_reply(sock, option, nbd.OptionReply.ACK)
            if option == nbd.Option.GO:
                break
        while True:
            raw = sock.recv(nbd.REQUEST_HEADER.size, socket.MSG_WAITALL)
            if len(raw) < nbd.REQUEST_HEADER.size:
                return
            _, _, command, handle, offset, length = nbd.REQUEST_HEADER.unpack(raw)
            if command == nbd.Command.DISC:
                return
            sock.sendall(self.script(command, handle, offset, length))

    def close(self):
        self.listener.close()
        self.thread.join(5)


@pytest.fixture
def serve():
    servers = []

    def make(script) -> nbd.NBDClient:
        server = ScriptedServer(script)
        servers.append(server)
        return nbd.NBDClient(server.path, "x", timeout=10, block_status=True)

    yield make
    for server in servers:
        server.close()


def test_read_reassembles_chunks_in_any_order_with_holes(serve):
    def script(command, handle, offset, length):
        half = length // 2
        return (hole_chunk(handle, offset + half, length - half)
                + data_chunk(handle, offset, b"\xaa" * half, done=True))

    client = serve(script)
    assert client.structured and client.can_block_status
    assert client.read(4096, 8192) == b"\xaa" * 4096 + bytes(4096)
    client.close()


def test_an_error_chunk_fails_the_request_and_the_connection_goes_on(serve):
    calls = []

    def script(command, handle, offset, length):
        calls.append(offset)
        if len(calls) == 1:
            return data_chunk(handle, offset, b"x" * length) + error_chunk(handle, 5, b"bad")
        return data_chunk(handle, offset, b"y" * length, done=True)

    client = serve(script)
    with pytest.raises(nbd.RequestError, match="bad") as info:
        client.read(0, 4096)
    assert info.value.error == 5
    assert client.read(0, 4096) == b"y" * 4096
    client.close()


def test_block_status_keeps_our_context_and_cuts_at_the_request_end(serve):
    def script(command, handle, offset, length):
        assert command == nbd.Command.BLOCK_STATUS
        return (status_chunk(handle, 99, [(length, 0)])
                + status_chunk(handle, CONTEXT, [(4096, 0), (length, 3)])
                + none_chunk(handle))

    client = serve(script)
    assert client.block_status(0, 65536) == [(4096, 0), (65536 - 4096, 3)]
    client.close()


@pytest.mark.parametrize("bad", ["data_outside", "short_cover", "hole_size_zero",
                                 "status_for_read", "zero_descriptor", "no_status",
                                 "huge_chunk", "data_for_status"])
def test_chunks_a_server_must_not_send_close_the_client(serve, bad):
    def script(command, handle, offset, length):
        if bad == "data_outside":
            return data_chunk(handle, offset + 512, b"z" * length, done=True)
        if bad == "short_cover":
            return data_chunk(handle, offset, b"z" * (length // 2), done=True)
        if bad == "hole_size_zero":
            return hole_chunk(handle, offset, 0, done=True)
        if bad == "status_for_read":
            return status_chunk(handle, CONTEXT, [(length, 0)], done=True)
        if bad == "zero_descriptor":
            return status_chunk(handle, CONTEXT, [(0, 0)], done=True)
        if bad == "no_status":
            return none_chunk(handle)
        if bad == "data_for_status":   # as long as the request: never read, never allocated
            return struct.pack("!IHHQI", nbd.STRUCTURED_REPLY_MAGIC, 0,
                               nbd.ReplyType.OFFSET_DATA, handle, 8 + length)
        return struct.pack("!IHHQI", nbd.STRUCTURED_REPLY_MAGIC, 0, nbd.ReplyType.BLOCK_STATUS,
                           handle, nbd.MAX_STATUS_CHUNK + 1)

    client = serve(script)
    with pytest.raises(nbd.ProtocolError):
        if bad in ("zero_descriptor", "no_status", "huge_chunk"):
            client.block_status(0, 8192)
        elif bad == "data_for_status":
            client.block_status(0, SIZE)
        else:
            client.read(0, 8192)
    with pytest.raises(OSError):
        client.read(0, 4096)        # the client closed its socket

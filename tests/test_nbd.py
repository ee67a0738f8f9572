"""nbd.py against the real QEMU tools, and against malformed input.

QEMU is the peer that matters: qemu-io, nbdinfo and qemu-img talk to
NBDServer; qemu-storage-daemon's active mirror writes into it; NBDClient
reads qemu-nbd and QSD exports.  Raw-socket tests send what QEMU never
would and check the server answers with an error or a close, and keeps
serving.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import stat
import struct
import threading

import pytest

import nbd
from qemu_harness import (MiB, MemoryHandler, QemuNBD, RandomWorkload, create_image,  # noqa: F401
                          image_sha256, nbd_sha256, nbd_uri, qemu_io, qsd, qsd_factory,
                          requires_qemu, run, sockdir, wait_until)

pytestmark = requires_qemu

SIZE = 16 * MiB
EXPORT = "tgt"


@pytest.fixture
def memory_server(sockdir):
    """An NBDServer over a MemoryHandler on a unix socket: (server, handler)."""
    handler = MemoryHandler(SIZE)
    server = nbd.NBDServer(str(sockdir / "tgt.sock"), EXPORT, SIZE, handler)
    server.start()
    try:
        yield server, handler
    finally:
        server.stop()


# ---------------------------------------------------------------------------
# QEMU tools as clients of NBDServer.


def test_qemu_io_write_read_zero_flush(memory_server):
    server, handler = memory_server
    out = qemu_io(server.address, "write -P 0xab 0 64k", "write -P 0xcd 1m 4k",
                  "write -z 4k 8k", "flush", "read -P 0xab 0 4k", "read -P 0 4k 8k",
                  "read -P 0xab 12k 52k", "read -P 0xcd 1m 4k", export=EXPORT)
    assert "Pattern verification failed" not in out
    expected = bytearray(SIZE)
    expected[0:65536] = b"\xab" * 65536
    expected[4096:12288] = bytes(8192)
    expected[MiB:MiB + 4096] = b"\xcd" * 4096
    assert handler.image == expected
    assert handler.ops["write_zeroes"] == 1
    assert handler.ops["flush"] >= 1


def test_nbdinfo_sees_export_size_and_flags(memory_server):
    server, _ = memory_server
    info = json.loads(run(["nbdinfo", "--json", nbd_uri(server.address, EXPORT)]).stdout)
    export = info["exports"][0]
    assert export["export-size"] == SIZE
    assert info["protocol"] == "newstyle-fixed"
    assert export["can_flush"] is True and export["can_zero"] is True
    assert export["can_trim"] is False and export["is_read_only"] is False
    assert export["block_size_maximum"] == nbd.MAX_REQUEST_LENGTH
    listing = run(["nbdinfo", "--list", "--json", nbd_uri(server.address, "")]).stdout
    assert [e["export-name"] for e in json.loads(listing)["exports"]] == [EXPORT]


def test_qemu_img_convert_into_and_out_of_server(memory_server, tmp_path):
    server, handler = memory_server
    source = tmp_path / "src.raw"
    data = bytearray(os.urandom(SIZE // 2)) + bytes(SIZE // 2)   # data, then a hole
    source.write_bytes(data)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source),
         nbd_uri(server.address, EXPORT)])
    assert handler.image == data
    copy = tmp_path / "copy.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
         nbd_uri(server.address, EXPORT), str(copy)])
    assert copy.read_bytes() == data


# ---------------------------------------------------------------------------
# qemu-storage-daemon's active mirror into NBDServer.


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_active_mirror_delivers_every_write_byte_identical(qsd_factory, sockdir, fmt):
    source = qsd_factory(size=SIZE, fmt=fmt)
    handler = MemoryHandler(SIZE)
    with nbd.NBDServer(str(sockdir / "tgt.sock"), EXPORT, SIZE, handler) as server:
        source.start_mirror(server.address, EXPORT)
        workload = RandomWorkload(seed=4, size=SIZE, count=150, max_length=256 * 1024)
        workload.run_qemu_io(source.export_path, export=source.export_name)
        # write-blocking: each write was at the target before qemu-io saw it complete
        expected = workload.apply(bytearray(SIZE))
        assert handler.sha256() == hashlib.sha256(expected).hexdigest()
        assert image_sha256(source.image, fmt) == handler.sha256()
        assert handler.ops["write"] > 0 and handler.ops["write_zeroes"] > 0
        assert source.job_status("rep0") == "ready"
        source.stop_mirror()


class HoldingHandler(MemoryHandler):
    """Holds write replies until ``hold`` writes are pending, then answers
    them newest first from another thread: replies leave out of order."""

    def __init__(self, size: int, hold: int):
        super().__init__(size)
        self.hold = hold
        self.pending: list = []
        self.max_pending = 0
        self.arrived: list[int] = []       # offsets in the order the Handler saw them
        self.order: list[int] = []         # offsets in the order replies were sent
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._answer, name="holding-replier", daemon=True)
        self.thread.start()

    def write(self, offset, data, reply):
        with self.lock:
            self.image[offset:offset + len(data)] = data
            self.ops["write"] += 1
        with self.cond:
            self.pending.append((offset, reply))
            self.arrived.append(offset)
            self.max_pending = max(self.max_pending, len(self.pending))
            self.cond.notify_all()

    def _answer(self):
        while not self.stop.is_set():
            with self.cond:
                # bounded: after 5 s answer whatever is pending (the test then fails)
                self.cond.wait_for(lambda: len(self.pending) >= self.hold or self.stop.is_set(),
                                   timeout=5.0)
                batch, self.pending = self.pending, []
            for offset, reply in reversed(batch):
                self.order.append(offset)
                reply(0)

    def close(self):
        self.stop.set()
        with self.cond:
            self.cond.notify_all()
        self.thread.join(5.0)


def test_requests_in_flight_are_answered_out_of_order(sockdir):
    handler = HoldingHandler(SIZE, hold=8)
    try:
        with nbd.NBDServer(str(sockdir / "tgt.sock"), EXPORT, SIZE, handler) as server:
            commands = [f"aio_write -P {i + 1:#x} {i * 65536} 64k" for i in range(8)]
            qemu_io(server.address, *commands, "aio_flush", export=EXPORT)
    finally:
        handler.close()
    assert handler.max_pending == 8
    assert handler.order == handler.arrived[::-1] != handler.arrived
    for i in range(8):
        assert handler.image[i * 65536:(i + 1) * 65536] == bytes([i + 1]) * 65536


# ---------------------------------------------------------------------------
# Malformed input over a raw socket.


def raw_connect(address: str, export: str = EXPORT) -> socket.socket:
    """Fixed newstyle handshake by hand; returns a socket in transmission."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10.0)
    sock.connect(address)
    magic, opt, flags = nbd.SERVER_GREETING.unpack(recv(sock, nbd.SERVER_GREETING.size))
    assert (magic, opt) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
    sock.sendall(nbd.CLIENT_FLAGS.pack(nbd.ClientFlag.FIXED_NEWSTYLE | nbd.ClientFlag.NO_ZEROES))
    name = export.encode()
    send_option(sock, nbd.Option.GO, nbd.NAME_LENGTH.pack(len(name)) + name + b"\0\0")
    while True:
        reply, _ = recv_option_reply(sock)
        if reply == nbd.OptionReply.ACK:
            return sock
        assert reply == nbd.OptionReply.INFO


def recv(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def send_option(sock, option, data=b""):
    sock.sendall(nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, option, len(data)) + data)


def recv_option_reply(sock):
    magic, _, reply, length = nbd.OPTION_REPLY_HEADER.unpack(recv(sock, 20))
    assert magic == nbd.OPTION_REPLY_MAGIC
    return reply, recv(sock, length)


def request(sock, command, offset, length, payload=b"", flags=0, handle=7):
    sock.sendall(nbd.REQUEST_HEADER.pack(nbd.REQUEST_MAGIC, flags, command, handle,
                                         offset, length) + payload)


def reply_error(sock, handle=7) -> int:
    magic, error, echoed = nbd.SIMPLE_REPLY_HEADER.unpack(recv(sock, 16))
    assert (magic, echoed) == (nbd.SIMPLE_REPLY_MAGIC, handle)
    return error


def assert_closed(sock):
    assert sock.recv(1) == b""


def still_serves(server):
    with nbd.NBDClient(server.address, EXPORT) as client:
        client.write(0, b"alive")
        assert client.read(0, 5) == b"alive"


def test_bad_request_magic_closes_connection(memory_server):
    server, _ = memory_server
    with raw_connect(server.address) as sock:
        sock.sendall(struct.pack("!IHHQQI", 0x12345678, 0, nbd.Command.READ, 1, 0, 512))
        assert_closed(sock)
    still_serves(server)


def test_oversize_write_closes_and_oversize_read_is_einval(memory_server):
    server, _ = memory_server
    with raw_connect(server.address) as sock:
        request(sock, nbd.Command.READ, 0, nbd.MAX_REQUEST_LENGTH + 1)
        assert reply_error(sock) == errno.EINVAL
        request(sock, nbd.Command.WRITE, 0, nbd.MAX_REQUEST_LENGTH + 1)
        assert_closed(sock)
    still_serves(server)


def test_out_of_range_and_unknown_commands_get_errors_and_connection_goes_on(memory_server):
    server, handler = memory_server
    with raw_connect(server.address) as sock:
        request(sock, nbd.Command.READ, SIZE - 512, 1024)
        assert reply_error(sock) == errno.EINVAL
        request(sock, nbd.Command.WRITE, SIZE - 2, 4, payload=b"abcd")
        assert reply_error(sock) == errno.ENOSPC
        request(sock, nbd.Command.WRITE_ZEROES, SIZE, 1)
        assert reply_error(sock) == errno.ENOSPC
        request(sock, nbd.Command.READ, 2**64 - 512, 1024)
        assert reply_error(sock) == errno.EINVAL
        request(sock, 99, 0, 0)
        assert reply_error(sock) == errno.EINVAL
        request(sock, nbd.Command.TRIM, 0, 4096)
        assert reply_error(sock) == errno.EINVAL
        request(sock, nbd.Command.WRITE, 0, 4, payload=b"wxyz", flags=nbd.CommandFlag.DF)
        assert reply_error(sock) == errno.EINVAL
        # the stream is still in step: a good write and read work
        request(sock, nbd.Command.WRITE, 8, 4, payload=b"good", handle=8)
        assert reply_error(sock, handle=8) == 0
        request(sock, nbd.Command.READ, 8, 4, handle=9)
        assert reply_error(sock, handle=9) == 0
        assert recv(sock, 4) == b"good"
        request(sock, nbd.Command.DISC, 0, 0)
        assert_closed(sock)
    assert handler.image[SIZE - 2:] == b"\0\0" and handler.image[0:4] == b"\0\0\0\0"


def test_handshake_errors(memory_server):
    server, _ = memory_server
    # unknown client flag: closed
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(server.address)
        recv(sock, nbd.SERVER_GREETING.size)
        sock.sendall(nbd.CLIENT_FLAGS.pack(0x80 | nbd.ClientFlag.FIXED_NEWSTYLE))
        assert_closed(sock)
    # unknown option and structured replies: ERR_UNSUP; unknown export: ERR_UNKNOWN;
    # oversize option: closed
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(server.address)
        recv(sock, nbd.SERVER_GREETING.size)
        sock.sendall(nbd.CLIENT_FLAGS.pack(nbd.ClientFlag.FIXED_NEWSTYLE))
        send_option(sock, nbd.Option.STRUCTURED_REPLY)
        assert recv_option_reply(sock)[0] == nbd.OptionReply.ERR_UNSUP
        send_option(sock, 1000, b"xx")
        assert recv_option_reply(sock)[0] == nbd.OptionReply.ERR_UNSUP
        send_option(sock, nbd.Option.GO, nbd.NAME_LENGTH.pack(4) + b"nope" + b"\0\0")
        assert recv_option_reply(sock)[0] == nbd.OptionReply.ERR_UNKNOWN
        send_option(sock, nbd.Option.GO, nbd.NAME_LENGTH.pack(400) + b"short")
        assert recv_option_reply(sock)[0] == nbd.OptionReply.ERR_INVALID
        send_option(sock, nbd.Option.LIST, b"junk")
        assert recv_option_reply(sock)[0] == nbd.OptionReply.ERR_INVALID
        sock.sendall(nbd.OPTION_HEADER.pack(nbd.IHAVEOPT, nbd.Option.GO, 1 << 30))
        assert_closed(sock)
    # NBD_OPT_ABORT: ACK, then closed
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(server.address)
        recv(sock, nbd.SERVER_GREETING.size)
        sock.sendall(nbd.CLIENT_FLAGS.pack(nbd.ClientFlag.FIXED_NEWSTYLE))
        send_option(sock, nbd.Option.ABORT)
        assert recv_option_reply(sock)[0] == nbd.OptionReply.ACK
        assert_closed(sock)
    still_serves(server)


def test_export_name_option_enters_transmission(memory_server):
    server, _ = memory_server
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(server.address)
        recv(sock, nbd.SERVER_GREETING.size)
        sock.sendall(nbd.CLIENT_FLAGS.pack(nbd.ClientFlag.FIXED_NEWSTYLE))
        send_option(sock, nbd.Option.EXPORT_NAME, EXPORT.encode())
        size, flags = nbd.EXPORT_NAME_REPLY.unpack(recv(sock, nbd.EXPORT_NAME_REPLY.size))
        assert (size, flags) == (SIZE, nbd.SERVER_TRANSMISSION_FLAGS)
        assert recv(sock, 124) == bytes(124)           # NO_ZEROES was not asked for
        request(sock, nbd.Command.FLUSH, 0, 0)
        assert reply_error(sock) == 0


# ---------------------------------------------------------------------------
# Handler contract and server life cycle.


class FaultyHandler(MemoryHandler):
    def __init__(self, size):
        super().__init__(size)
        self.late: list = []

    def write(self, offset, data, reply):
        if offset == 0:
            raise RuntimeError("simulated handler bug")
        if offset == 4096:
            reply(0)
            reply(0)                         # a bug: the second call is ignored
            return
        self.late.append(reply)              # never answered until the test does

    def read(self, offset, length, reply):
        reply(0, b"short")                   # wrong length: the server sends EIO


def test_handler_faults_become_eio_and_late_replies_are_dropped(sockdir, caplog):
    caplog.set_level(logging.WARNING, logger="nbd")
    handler = FaultyHandler(SIZE)
    server = nbd.NBDServer(str(sockdir / "tgt.sock"), EXPORT, SIZE, handler)
    server.start()
    try:
        with nbd.NBDClient(server.address, EXPORT) as client:
            with pytest.raises(nbd.RequestError) as err:
                client.write(0, b"x" * 512)
            assert err.value.error == errno.EIO
            client.write(4096, b"y" * 512)
            with pytest.raises(nbd.RequestError) as err:
                client.read(0, 512)
            assert err.value.error == errno.EIO
        with raw_connect(server.address) as raw:
            request(raw, nbd.Command.WRITE, 8192, 4, payload=b"hang")
            wait_until(lambda: handler.late, 10.0, "the held write")
    finally:
        server.stop(timeout=1.0)
    assert not any(t.name.startswith("nbd-") for t in threading.enumerate()
                   if t.is_alive() and EXPORT in t.name)
    handler.late[0](0)                       # after close: dropped quietly, no exception
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "called twice" in messages and "raised" in messages
    assert "answered with 5 bytes" in messages


def test_many_connections_and_tcp(tmp_path):
    handler = MemoryHandler(SIZE)
    with nbd.NBDServer(("127.0.0.1", 0), EXPORT, SIZE, handler) as server:
        host, port = server.address
        assert port != 0
        clients = [nbd.NBDClient((host, port), EXPORT) for _ in range(4)]
        try:
            for i, client in enumerate(clients):
                client.write(i * 4096, bytes([i + 1]) * 4096)
            wait_until(lambda: server.connection_count == 4, 10.0, "4 connections")
            for i, client in enumerate(clients):
                assert client.read(i * 4096, 4096) == bytes([i + 1]) * 4096
        finally:
            for client in clients:
                client.close()
        wait_until(lambda: server.connection_count == 0, 10.0, "connections closed")
        out = run(["qemu-io", "-f", "raw", f"nbd://{host}:{port}/{EXPORT}",
                   "-c", "write -P 0x3c 64k 8k", "-c", "read -P 0x3c 64k 8k"]).stdout
        assert "Pattern verification failed" not in out
        assert handler.image[65536:65536 + 8192] == b"\x3c" * 8192


# ---------------------------------------------------------------------------
# NBDClient against QEMU's servers.


def test_client_against_qemu_nbd(tmp_path):
    image = create_image(tmp_path / "q.raw", 8 * MiB)
    server = QemuNBD(image).start()
    try:
        with nbd.NBDClient(str(server.export_path), "disk0") as client:
            assert client.size == 8 * MiB
            assert client.transmission_flags & nbd.TransmissionFlag.SEND_FLUSH
            data = os.urandom(3 * MiB)
            client.max_block = 1 * MiB              # force splitting into several requests
            client.write(MiB, data)
            client.write_zeroes(2 * MiB, 4096)
            client.flush()
            expected = bytearray(8 * MiB)
            expected[MiB:4 * MiB] = data
            expected[2 * MiB:2 * MiB + 4096] = bytes(4096)
            assert client.read(0, 8 * MiB) == expected
            buf = bytearray(4096)
            client.readinto(MiB, buf)
            assert buf == data[:4096]
            with pytest.raises(ValueError):
                client.read(8 * MiB - 1, 2)
            with pytest.raises(nbd.OptionError):
                nbd.NBDClient(str(server.export_path), "no-such-export")
    finally:
        server.stop()
    assert image.read_bytes() == expected


def test_client_reads_qsd_export(qsd):
    qemu_io(qsd.export_path, "write -P 0x5a 1m 128k", "write -P 0x11 3m 4k")
    with nbd.NBDClient(str(qsd.export_path), qsd.export_name) as client:
        assert client.size == qsd.size
        assert client.read(MiB, 128 * 1024) == b"\x5a" * 128 * 1024
        assert client.read(3 * MiB - 4096, 8192) == bytes(4096) + b"\x11" * 4096
    assert nbd_sha256(str(qsd.export_path), qsd.export_name) == image_sha256(qsd.image)


def test_active_mirror_with_writes_in_flight_answered_out_of_order(qsd_factory, sockdir):
    source = qsd_factory(size=SIZE, fmt="raw")
    handler = HoldingHandler(SIZE, hold=8)
    try:
        with nbd.NBDServer(str(sockdir / "tgt.sock"), EXPORT, SIZE, handler) as server:
            source.start_mirror(server.address, EXPORT)
            commands = [f"aio_write -P {i + 1:#x} {i * 65536} 64k" for i in range(8)]
            qemu_io(source.export_path, *commands, "aio_flush", export=source.export_name)
            source.stop_mirror()
    finally:
        handler.close()
    assert handler.max_pending == 8
    assert handler.order == handler.arrived[::-1] != handler.arrived
    assert hashlib.sha256(handler.image).hexdigest() == image_sha256(source.image)


def test_qemu_reconnects_to_a_restarted_server(qsd_factory, sockdir):
    source = qsd_factory(size=SIZE, fmt="raw")
    handler = MemoryHandler(SIZE)
    path = str(sockdir / "tgt.sock")
    first = nbd.NBDServer(path, EXPORT, SIZE, handler)
    first.start()
    try:
        source.start_mirror(path, EXPORT)
        qemu_io(source.export_path, "write -P 0x21 0 64k", export=source.export_name)
    finally:
        first.stop()
    with nbd.NBDServer(path, EXPORT, SIZE, handler) as second:
        # this write finds the old connection gone; QEMU reconnects within reconnect-delay
        qemu_io(source.export_path, "write -P 0x22 64k 64k", export=source.export_name)
        assert second.connection_count == 1
        assert handler.image[:131072] == b"\x21" * 65536 + b"\x22" * 65536
        assert image_sha256(source.image) == handler.sha256()
        source.stop_mirror()


def test_server_refuses_a_socket_in_use_and_replaces_a_stale_one(sockdir):
    path = str(sockdir / "tgt.sock")
    with nbd.NBDServer(path, EXPORT, SIZE, MemoryHandler(SIZE)):
        with pytest.raises(FileExistsError):
            nbd.NBDServer(path, EXPORT, SIZE, MemoryHandler(SIZE)).start()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)                       # bound, never listening: what a crash leaves
    stale.close()
    with nbd.NBDServer(path, EXPORT, SIZE, MemoryHandler(SIZE)) as server:
        still_serves(server)
    (sockdir / "file").write_text("not a socket")
    with pytest.raises(FileExistsError):
        nbd.NBDServer(str(sockdir / "file"), EXPORT, SIZE, MemoryHandler(SIZE)).start()


@pytest.mark.parametrize("text, address", [
    ("/run/rep/tgt.sock", "/run/rep/tgt.sock"),
    ("127.0.0.1:10809", ("127.0.0.1", 10809)),
    ("[::1]:10809", ("::1", 10809)),
])
def test_parse_address(text, address):
    assert nbd.parse_address(text) == address


@pytest.mark.parametrize("text", ["10809", "host:", ":10809", "host:port"])
def test_parse_address_rejects(text):
    with pytest.raises(ValueError, match="HOST:PORT"):
        nbd.parse_address(text)


# ---------------------------------------------------------------------------
# The harness itself: what other test files rely on.


def test_harness_qsd_survives_kill_and_restart(qsd_factory):
    import signal
    from qemu_harness import QMPError
    source = qsd_factory(size=4 * MiB, fmt="qcow2")
    qemu_io(source.export_path, "write -P 0x77 0 64k", export=source.export_name)
    with pytest.raises(QMPError, match="CommandNotFound"):
        source.qmp("no-such-command")
    source.kill(signal.SIGKILL)
    assert source.proc.returncode == -signal.SIGKILL
    source.restart()
    qemu_io(source.export_path, "read -P 0x77 0 64k", export=source.export_name)
    with pytest.raises(RuntimeError, match="Pattern verification failed"):
        qemu_io(source.export_path, "read -P 0x78 0 4k", export=source.export_name)
    expected = bytearray(4 * MiB)
    expected[:65536] = b"\x77" * 65536
    assert image_sha256(source.image, "qcow2") == hashlib.sha256(expected).hexdigest()


def test_random_workload_is_seeded_and_bounded():
    a = RandomWorkload(seed=1, size=MiB, count=50, max_length=64 * 1024)
    b = RandomWorkload(seed=1, size=MiB, count=50, max_length=64 * 1024)
    assert a.writes == b.writes and len(a.writes) == 50
    assert a.writes != RandomWorkload(seed=2, size=MiB, count=50).writes
    for off, length, _ in a.writes:
        assert off % 4096 == 0 and 4096 <= length <= 65536 and off + length <= MiB


def test_recv_thread_stops_reading_at_max_in_flight(sockdir, monkeypatch):
    monkeypatch.setattr(nbd, "MAX_IN_FLIGHT", 2)
    held: list = []
    arrived = threading.Event()

    class Holder(MemoryHandler):
        def write(self, offset, data, reply):
            held.append(reply)
            arrived.set()

    with nbd.NBDServer(str(sockdir / "tgt.sock"), EXPORT, SIZE, Holder(SIZE)) as server:
        with raw_connect(server.address) as sock:
            for handle in range(4):
                request(sock, nbd.Command.WRITE, handle * 512, 512, payload=bytes(512),
                        handle=handle)
            wait_until(lambda: len(held) == 2, 10.0, "two writes at the handler")
            threading.Event().wait(0.2)          # grace for a wrong third arrival
            assert len(held) == 2
            held[1](0)
            assert reply_error(sock, handle=1) == 0
            wait_until(lambda: len(held) == 3, 10.0, "the third write after one reply")
            for reply in (held[0], held[2]):
                reply(0)
            wait_until(lambda: len(held) == 4, 10.0, "the fourth write")
            held[3](0)
            assert sorted(struct.unpack("!IIQ", recv(sock, 16))[2] for _ in range(3)) == [0, 2, 3]


def test_client_falls_back_to_export_name(memory_server, monkeypatch):
    server, _ = memory_server
    monkeypatch.setattr(nbd._Connection, "on_OPT_GO", lambda self, option, data:
                        self.send_option_reply(option, nbd.OptionReply.ERR_UNSUP))
    with nbd.NBDClient(server.address, EXPORT) as client:
        assert client.size == SIZE
        client.write(0, b"fallback")
        assert client.read(0, 8) == b"fallback"


def test_export_name_option_with_unknown_name_closes(memory_server):
    server, _ = memory_server
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(server.address)
        recv(sock, nbd.SERVER_GREETING.size)
        sock.sendall(nbd.CLIENT_FLAGS.pack(nbd.ClientFlag.FIXED_NEWSTYLE))
        send_option(sock, nbd.Option.EXPORT_NAME, b"nope")
        assert_closed(sock)
    still_serves(server)


def test_a_unix_socket_gets_its_mode_before_it_listens(tmp_path, monkeypatch):
    """``socket_mode`` is set between bind and listen: no moment where another
    user could connect under a wide umask."""
    path = str(tmp_path / "s.nbd")
    seen = []
    real_listen = socket.socket.listen

    def listen(sock, *args):
        seen.append(stat.S_IMODE(os.stat(path).st_mode))
        return real_listen(sock, *args)

    monkeypatch.setattr(socket.socket, "listen", listen)
    old = os.umask(0)
    try:
        server = nbd.NBDServer(path, "e", 4096, nbd.Handler(), socket_mode=0o600)
        server.start()
    finally:
        os.umask(old)
    try:
        assert seen == [0o600]
    finally:
        server.stop()

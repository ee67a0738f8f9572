"""The fault proxy itself: forwards faithfully, and each fault does what it says."""

import socket
import threading

import pytest

from faults.proxy import FaultProxy
from hubtools import wait_until


@pytest.fixture
def echo_server():
    """A loopback echo server: each connection echoes until EOF."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept():
        server.settimeout(0.05)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True, name="echo").start()

    thread = threading.Thread(target=accept, daemon=True, name="echo-accept")
    thread.start()
    yield server.getsockname()[:2]
    stop.set()
    thread.join(5)
    server.close()


def recv_exactly(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def test_forwards_both_ways_and_counts_bytes(echo_server):
    with FaultProxy(echo_server) as proxy:
        with socket.create_connection(proxy.address, timeout=5) as sock:
            payload = bytes(range(256)) * 4096
            threading.Thread(target=sock.sendall, args=(payload,), daemon=True).start()
            assert recv_exactly(sock, len(payload)) == payload
            # The proxy counts a chunk after forwarding it: the client may
            # hold every byte a moment before the last one is counted.
            wait_until(lambda: proxy.bytes_down >= len(payload), 5, "the last chunk counted")
        assert proxy.bytes_up == len(payload)
        assert proxy.bytes_down == len(payload)


def test_cut_closes_live_connections_and_accepts_new_ones(echo_server):
    with FaultProxy(echo_server) as proxy:
        sock = socket.create_connection(proxy.address, timeout=5)
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        assert proxy.cut() == 1
        assert sock.recv(16) == b""  # EOF: the peer saw the cut
        sock.close()
        with socket.create_connection(proxy.address, timeout=5) as again:
            again.sendall(b"back")
            assert recv_exactly(again, 4) == b"back"


def test_partition_refuses_until_healed(echo_server):
    with FaultProxy(echo_server) as proxy:
        proxy.partition()
        with socket.create_connection(proxy.address, timeout=5) as sock:
            try:
                sock.sendall(b"x")
                got = sock.recv(16)
            except ConnectionError:
                got = b""
            assert got == b""
        proxy.heal()
        with socket.create_connection(proxy.address, timeout=5) as sock:
            sock.sendall(b"ok")
            assert recv_exactly(sock, 2) == b"ok"


def test_stall_holds_bytes_and_resume_delivers_them_in_order(echo_server):
    with FaultProxy(echo_server) as proxy:
        with socket.create_connection(proxy.address, timeout=5) as sock:
            proxy.stall()
            sock.sendall(b"held")
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                sock.recv(16)
            sock.settimeout(5)
            proxy.resume()
            assert recv_exactly(sock, 4) == b"held"
            assert proxy.live_connections() == 1

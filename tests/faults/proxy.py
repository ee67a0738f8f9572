"""A TCP fault proxy for loopback tests: put it between an agent and a hub.

    agent ──> FaultProxy(listen 127.0.0.1:0) ──> hub

It forwards bytes both ways and, on command, injects the network faults a
replication link meets on its worst day:

- ``cut()``: close every connection at once (both sides see a reset/EOF);
  new connections are accepted again at once.
- ``partition()`` / ``heal()``: while partitioned, live connections are cut
  and new ones are closed as soon as they are accepted.
- ``stall()`` / ``resume()``: stop forwarding in both directions while the
  connections stay open (a hung peer, a half-open link).  Bytes queue in the
  kernel's buffers; nothing is lost or reordered.
- ``slow(bytes_per_second)``: rate-limit forwarding (None lifts the limit).

Every thread is named, stops on an Event and is joined with a deadline.  The
proxy counts the bytes it forwarded each way, so a test can check how much a
resync re-sent.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time

log = logging.getLogger("faultproxy")

#: How long a forwarding thread waits in select() before re-checking its
#: stop/stall state: bounds how late a cut or a stop takes effect.
POLL_INTERVAL = 0.05
CHUNK = 256 * 1024


class _Link:
    """One proxied connection: the client side and the upstream side."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket):
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._pump, daemon=True,
                                       name=f"faultproxy-link-{client.fileno()}")

    def close(self) -> None:
        """Cut the link: both sockets are shut down so both peers see it at once."""
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.upstream):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _pump(self) -> None:
        """Forwarding thread: copy bytes both ways until a side closes or a cut."""
        sel = selectors.DefaultSelector()
        sel.register(self.client, selectors.EVENT_READ, (self.upstream, "up"))
        sel.register(self.upstream, selectors.EVENT_READ, (self.client, "down"))
        try:
            while not self.closed.is_set():
                if self.proxy.stalled.is_set():
                    self.proxy.resumed.wait(POLL_INTERVAL)
                    continue
                for key, _ in sel.select(POLL_INTERVAL):
                    dest, direction = key.data
                    data = key.fileobj.recv(CHUNK)
                    if not data:
                        return
                    self.proxy._throttle(len(data))
                    dest.sendall(data)
                    self.proxy._count(direction, len(data))
        except OSError:
            pass
        finally:
            sel.close()
            self.close()
            self.proxy._forget(self)


class FaultProxy:
    """Forward 127.0.0.1:<port> to ``target`` and inject faults on command."""

    def __init__(self, target: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0)):
        self.target = target
        self._listener = socket.create_server(listen)
        self._listener.settimeout(POLL_INTERVAL)
        self.address = self._listener.getsockname()[:2]
        self._stop = threading.Event()
        self.stalled = threading.Event()
        self.resumed = threading.Event()
        self.resumed.set()
        self._partitioned = threading.Event()
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._rate: float | None = None
        self.bytes_up = 0      # client -> target (agent -> hub)
        self.bytes_down = 0    # target -> client (hub -> agent)
        self.connections = 0
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"faultproxy-accept-{self.address[1]}")

    # -- life cycle ---------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.resume()
        self.cut()
        self._thread.join(timeout)
        self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- faults ---------------------------------------------------------------

    def cut(self) -> int:
        """Close every live connection; return how many were cut."""
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()
        log.info("cut %d connection(s)", len(links))
        return len(links)

    def partition(self) -> None:
        """Cut everything and refuse new connections until ``heal()``."""
        self._partitioned.set()
        self.cut()

    def heal(self) -> None:
        self._partitioned.clear()

    def stall(self) -> None:
        """Stop forwarding (connections stay open) until ``resume()``."""
        self.resumed.clear()
        self.stalled.set()

    def resume(self) -> None:
        self.stalled.clear()
        self.resumed.set()

    def slow(self, bytes_per_second: float | None) -> None:
        """Limit forwarding to ``bytes_per_second`` in all (None: no limit)."""
        self._rate = bytes_per_second

    def live_connections(self) -> int:
        with self._lock:
            return len(self._links)

    # -- internals ------------------------------------------------------------

    def _accept_loop(self) -> None:
        """Accept thread: one _Link (and its thread) per accepted connection."""
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            if self._partitioned.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError as err:
                log.info("upstream %s:%d refused: %s", *self.target, err)
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            link = _Link(self, client, upstream)
            with self._lock:
                self._links.add(link)
                self.connections += 1
            link.thread.start()

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def _count(self, direction: str, n: int) -> None:
        with self._lock:
            if direction == "up":
                self.bytes_up += n
            else:
                self.bytes_down += n

    def _throttle(self, n: int) -> None:
        rate = self._rate
        if rate:
            # Pacing, not synchronisation: each chunk takes its share of time.
            time.sleep(n / rate)

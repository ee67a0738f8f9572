"""What an operator sees of either daemon, in one copy for both.

repagent.py and rephub.py each build their own status (a JSON document) and
their own metric families from it; what turns those into something a person
or a scraper reads is the same for both and lives here:

* ``fmt_bytes`` and ``format_table``: the ``status`` tables;
* ``print_line``: a line a script reads off a daemon's stdout, in one write;
* ``watch``: ``status --watch``, a redraw loop that survives a daemon that is
  not running yet or restarting;
* ``prometheus_text`` and ``MetricsServer``: ``GET /metrics`` in the
  Prometheus text exposition format (version 0.0.4), served from the same
  status document the JSON status shows, so the two never disagree;
* ``parse_host_port`` and ``add_status_options``: the ``HOST:PORT``
  arguments and the ``status`` options of both command lines;
* ``accept_forever`` and ``LogThrottle``: the accept loop of every listening
  socket (the hub's agents, both control sockets), which never dies and never
  spins, and its rate-limited warnings.

Standard library only, no state: each daemon passes its own logger.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import errno
import http.server
import json
import logging
import select
import socket
import sys
import threading
import time

#: Home the cursor and clear the screen (ANSI), for ``status --watch`` on a terminal.
CLEAR_SCREEN = "\x1b[H\x1b[2J"


# -- status tables ----------------------------------------------------------


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"  # pragma: no cover


def format_table(headers: list[str], rows: list[list[str]], right=()) -> list[str]:
    """Columns as wide as their widest cell; the columns numbered in ``right``
    (sizes, counts, times) are right-aligned so their units line up."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(headers)] + [line(r) for r in rows]


def print_line(text: str) -> None:
    """``text`` and its newline on stdout in one write(2).  ``print`` writes the
    two apart when stdout is unbuffered (``PYTHONUNBUFFERED``), so a daemon's
    thread logging to the same file (``> log 2>&1``) could land between them and
    hide the line from a script waiting for it."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def watch(fetch, render, interval: float, as_json: bool, failures) -> int:
    """``status --watch``: redraw every ``interval`` seconds until Ctrl-C (exit 0).

    On a terminal the screen is cleared before each table; otherwise (a pipe,
    a log) tables follow one another.  With ``as_json`` each refresh is one
    JSON document on one line.  A ``fetch`` failing with one of ``failures``
    (the daemon not running yet, or restarting) is shown and retried, not
    fatal.  An interval that is not > 0 is a ValueError naming ``--watch``."""
    if not interval > 0:
        raise ValueError(f"--watch {interval}: the interval must be > 0 seconds")
    clear = sys.stdout.isatty() and not as_json
    try:
        while True:
            try:
                st, err = fetch(), None
            except failures as e:
                st, err = None, e
            if as_json:
                if err is not None:
                    print(f"status: {err}", file=sys.stderr, flush=True)
                else:
                    print(json.dumps(st), flush=True)
            else:
                now = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S")
                body = f"status: {err}" if err is not None else render(st)
                print(f"{CLEAR_SCREEN if clear else ''}every {interval:g} s, {now} UTC"
                      f" (Ctrl-C to stop)\n{body}\n", flush=True)
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


# -- Prometheus -------------------------------------------------------------


def prometheus_escape(value) -> str:
    """A label value as the text format wants it: backslash, quote, newline escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus_text(families) -> str:
    """``families``: (name, type, help, [(labels dict, value), ...]); samples with a
    value of None are left out.  Returns the exposition text, one family after
    the other: ``# HELP``, ``# TYPE``, then ``name{label="v"} value`` lines."""
    out = []
    for name, kind, text, samples in families:
        out.append(f"# HELP {name} {text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if value is None:
                continue
            lab = ",".join(f'{k}="{prometheus_escape(v)}"' for k, v in labels.items())
            num = repr(float(value)) if isinstance(value, float) else str(int(value))
            out.append(f"{name}{{{lab}}} {num}" if lab else f"{name} {num}")
    return "\n".join(out) + "\n"


class MetricsServer:
    """``GET /metrics`` answers ``render()`` as Prometheus text; other paths 404.

    A ``ThreadingHTTPServer`` served by one daemon thread called ``name`` (each
    request gets its own short-lived thread); ``close`` stops it and joins the
    thread.  ``address`` is the bound (host, port), so port 0 picks a free one.
    What happens is logged to ``log``, the daemon's logger.
    """

    def __init__(self, listen: tuple[str, int], render, name: str, log: logging.Logger):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                """A request thread of the metrics server."""
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served here")
                    return
                try:
                    body = render().encode()
                except Exception as err:  # noqa: BLE001 - a scrape never kills the server
                    log.warning("metrics: building the status failed: %r", err)
                    self.send_error(500, "status unavailable")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                log.debug("metrics: %s %s", self.address_string(), fmt % args)

        server_class = http.server.ThreadingHTTPServer
        if ":" in listen[0]:
            server_class = type("ThreadingHTTPServer6", (server_class,),
                                {"address_family": socket.AF_INET6})
        self.server = server_class(listen, Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.5,),
                                       name=name, daemon=True)
        self.thread.start()
        log.info("metrics on http://%s:%d/metrics", *self.address)

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]

    def close(self) -> None:
        """Stop serving and join the server thread (the stopping thread)."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


# -- command lines ----------------------------------------------------------


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; an empty host means every
    address), for argparse's ``type=``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def add_status_options(parser: argparse.ArgumentParser) -> None:
    """The options both ``status`` subcommands take: ``--json`` and ``--watch``."""
    parser.add_argument("--json", action="store_true", help="the status document (with "
                        "--watch: one document per line per refresh)")
    parser.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                        help="redraw every SECONDS (default 2) until Ctrl-C")


# -- accept loops -----------------------------------------------------------

#: Out of descriptors, memory or threads, an accept loop waits this long,
#: doubling up to ACCEPT_BACKOFF_MAX, instead of retrying at once (it would
#: spin: the pending connection keeps the listener readable) ...
ACCEPT_BACKOFF_MIN = 0.05
ACCEPT_BACKOFF_MAX = 2.0
#: ... and logs each kind of such trouble at most once this often.
ACCEPT_LOG_INTERVAL = 30.0
#: accept() errors that mean the process or the system is out of a resource.
ACCEPT_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: How often an accept loop waiting for a client looks at its stop flag.
ACCEPT_POLL = 0.2


class LogThrottle:
    """One WARNING per ``interval`` for each kind of trouble, saying how many like
    it were held back meanwhile: a flood of peers or a lasting shortage of
    descriptors gives a few lines, not one per attempt.  Any thread (the
    accept loops of one daemon may share one); takes its lock."""

    def __init__(self, log: logging.Logger, interval: float = ACCEPT_LOG_INTERVAL):
        self.log = log
        self.interval = interval
        self.lock = threading.Lock()
        self.last: dict[str, float] = {}
        self.held: collections.Counter[str] = collections.Counter()

    def warning(self, kind: str, fmt: str, *args) -> None:
        now = time.monotonic()
        with self.lock:
            if kind in self.last and now - self.last[kind] < self.interval:
                self.held[kind] += 1
                return
            self.last[kind] = now
            held = self.held.pop(kind, 0)
        self.log.warning(fmt + (f" ({held} more like it in the last {self.interval:g} s)"
                                if held else ""), *args)


def accept_forever(sock: socket.socket, stop: threading.Event, start_one,
                   throttle: LogThrottle, what: str, hint: str = "raise the fd limit") -> None:
    """Accept ``what`` (e.g. "connection") on ``sock`` until ``stop`` is set and
    hand each to ``start_one(client, address)``, which returns True once the
    client is taken care of (False: it was refused and closed).  Runs in the
    listener's own thread; it never dies and never spins.

    Out of descriptors or memory (ACCEPT_RESOURCE_ERRNOS), or when
    ``start_one`` cannot start a thread (RuntimeError or MemoryError: the
    client is closed), it waits on ``stop`` for a delay doubling from
    ACCEPT_BACKOFF_MIN to ACCEPT_BACKOFF_MAX, back to none once a client is
    taken, and warns of each kind of trouble through ``throttle`` (with
    ``hint``, what the operator can do).  Any other error in ``start_one``
    closes that client only.
    """
    backoff = 0.0

    def more(backoff: float) -> float:
        return min(max(2 * backoff, ACCEPT_BACKOFF_MIN), ACCEPT_BACKOFF_MAX)

    while not stop.is_set():
        if backoff and stop.wait(backoff):
            return
        try:
            ready, _, _ = select.select([sock], [], [], ACCEPT_POLL)
            if not ready:
                continue
            client, address = sock.accept()
        except ValueError:      # the socket is closed (fd -1): we are stopping
            return
        except OSError as err:
            if stop.is_set() or err.errno == errno.EBADF:   # closed: we are stopping
                return
            if err.errno in ACCEPT_RESOURCE_ERRNOS:
                backoff = more(backoff)
                throttle.warning(
                    "accept-" + errno.errorcode.get(err.errno, "?"),
                    "accept failed: %s; new %ss wait (retrying every %g s at most; %s)",
                    err, what, ACCEPT_BACKOFF_MAX, hint)
            else:   # ECONNABORTED, EPROTO, ...: that peer is gone, the next one is not
                throttle.log.debug("accept failed: %s", err)
            continue
        peer = address[0] if isinstance(address, tuple) else "the control socket"
        try:
            taken = start_one(client, address)
        except (RuntimeError, MemoryError) as err:   # "can't start new thread"
            client.close()
            backoff = more(backoff)
            throttle.warning("thread", "%s from %s closed: cannot start its thread (%s)",
                             what, peer, err)
            continue
        except Exception as err:  # noqa: BLE001 - the accept loop never dies
            client.close()
            throttle.log.error("%s from %s closed: %r", what, peer, err, exc_info=err)
            continue
        if taken:
            backoff = 0.0

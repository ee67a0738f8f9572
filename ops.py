"""What an operator sees of either daemon, in one copy for both.

repagent.py and rephub.py each build their own status (a JSON document) and
their own metric families from it; what turns those into something a person
or a scraper reads is the same for both and lives here:

* ``fmt_bytes`` and ``format_table``: the ``status`` tables;
* ``watch``: ``status --watch``, a redraw loop that survives a daemon that is
  not running yet or restarting;
* ``prometheus_text`` and ``MetricsServer``: ``GET /metrics`` in the
  Prometheus text exposition format (version 0.0.4), served from the same
  status document the JSON status shows, so the two never disagree;
* ``parse_host_port`` and ``add_status_options``: the ``HOST:PORT``
  arguments and the ``status`` options of both command lines.

Standard library only, no state: each daemon passes its own logger.
"""

from __future__ import annotations

import argparse
import datetime
import http.server
import json
import logging
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

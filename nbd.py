"""The NBD subset QEMU speaks to a mirror target, and a small blocking client.

repagent sits on two NBD connections (docs/DESIGN.md "Data flows"):

* it is the **server** that qemu-storage-daemon's active mirror writes into
  (``NBDServer`` plus a ``Handler`` the agent implements), and
* it is a **client** of QSD's own export when the hub asks it to read the
  protected volume (``NBDClient``).

Both follow the NBD protocol specification (NetworkBlockDevice/nbd,
``doc/proto.md``); section names below are that document's.  Only this
subset is implemented:

* "Fixed newstyle negotiation": options ``NBD_OPT_EXPORT_NAME``,
  ``NBD_OPT_ABORT``, ``NBD_OPT_LIST``, ``NBD_OPT_INFO``, ``NBD_OPT_GO``.
  Every other option -- ``NBD_OPT_STRUCTURED_REPLY`` included -- is answered
  ``NBD_REP_ERR_UNSUP``; QEMU then falls back to simple replies.
* "Transmission phase", simple replies only (server side): ``NBD_CMD_READ``,
  ``NBD_CMD_WRITE``, ``NBD_CMD_WRITE_ZEROES``, ``NBD_CMD_FLUSH``,
  ``NBD_CMD_DISC``.  ``NBD_CMD_TRIM`` is not advertised (``NBD_FLAG_SEND_TRIM``
  clear) and is answered ``EINVAL`` like any command the server did not
  advertise: the Handler has no discard, QEMU's mirror never forwards
  discards (docs/QEMU.md "What reaches the target"), and a silent no-op
  would hide a client that breaks the spec.  ``NBD_CMD_FLAG_FUA`` is not
  advertised either; if a client sets it anyway it is accepted and ignored
  -- what a write's reply promises is the Handler's durability rule, not
  the flag's.

The client (``NBDClient``) asked for ``block_status=True`` also negotiates
``NBD_OPT_STRUCTURED_REPLY`` and ``NBD_OPT_SET_META_CONTEXT`` "base:allocation"
("Metadata querying"), then sends ``NBD_CMD_BLOCK_STATUS`` and reads READ
replies as structured chunks (``OFFSET_DATA``, ``OFFSET_HOLE``, error
chunks).  A server that refuses either option leaves the client on simple
replies, with ``can_block_status`` false.

What malformed input gets ("Terminating the transmission phase": either
side may hard-disconnect on a violation of a mandatory condition):

    bad request/option magic, unknown client flags,       close the connection
    WRITE longer than MAX_REQUEST_LENGTH (its payload
    cannot be skipped safely), option > MAX_OPTION_LENGTH
    READ longer than MAX_REQUEST_LENGTH                   EINVAL
    READ past the end of the export                       EINVAL
    WRITE / WRITE_ZEROES past the end                     ENOSPC (payload consumed)
    unknown or unadvertised command or command flag       EINVAL
    GO/INFO for another export name                       NBD_REP_ERR_UNKNOWN

Public API::

    NBDServer(address, export_name, size, handler)   .start() .stop(timeout)
        .address (bound; TCP port 0 resolved) .connection_count, context manager
    Handler                  write / write_zeroes / flush / read, each with reply()
    NBDClient(address, export_name="", timeout=60.0, block_status=False)
        .size .transmission_flags .max_block .structured .can_block_status
        .read(off, len) -> bytes   .readinto(off, buf)   .write(off, data)
        .write_zeroes(off, len)    .flush()              .close(), context manager
        .block_status(off, len) -> [(length, flags)]   (NBD_STATE_HOLE/_ZERO)
    parse_address("HOST:PORT" | "/path.sock")
    NBDError, ProtocolError, ConnectionClosed, OptionError, RequestError(.error)

Threads (server side)::

    nbd-accept-<export>            accepts connections (QEMU reconnects)
    nbd-conn-<export>-<n>          one per connection: handshake, then reads
                                   requests one after the other and calls the
                                   Handler in arrival order
    any thread                     calls reply(); replies go out under the
                                   connection's send lock, so they may leave
                                   in any order (QEMU keeps up to 16 in flight)

Exception tree::

    NBDError
     +-- ProtocolError     the peer broke the protocol: close the connection
     |    +-- ConnectionClosed   the peer closed the socket in mid-message
     +-- OptionError       (client) the server refused an option, e.g. NBD_OPT_GO
     +-- RequestError      one request failed: reply with its NBD error, go on
                           (client: the server answered this request with an error)
"""

from __future__ import annotations

import enum
import errno
import itertools
import logging
import os
import socket
import stat
import struct
import threading
import time
from typing import Callable, Union

log = logging.getLogger("nbd")

Address = Union[str, "tuple[str, int]"]
"""A unix socket path (``str``) or a TCP ``(host, port)`` pair."""

# ---------------------------------------------------------------------------
# Limits.  Every length read from the wire is checked against one of these
# before anything is allocated.

MAX_REQUEST_LENGTH = 32 * 1024 * 1024
"""Largest READ/WRITE payload (bytes).  QEMU's own NBD_MAX_BUFFER_SIZE: QEMU
never sends more in one request, and we hold at most MAX_IN_FLIGHT of these
in memory per connection.  Advertised as the maximum block size."""

REPLY_SEND_BUFFER = 4 * 1024 * 1024
"""SO_SNDBUF asked for each client connection (the kernel caps it at
net.core.wmem_max): a 1 MiB read reply then goes out in one ``sendmsg``
rather than in pieces of the default 208 KiB, each waiting for the client
to read the last; about 10 % more throughput for 1 MiB reads at QD1."""

MAX_STRING_LENGTH = 4096
"""The spec: a string (export name, error message) MUST be no longer."""

MAX_OPTION_LENGTH = 4 + MAX_STRING_LENGTH + 2 + 2 * 64
"""Largest option payload we read: NBD_OPT_GO's name length, the name and up
to 64 information requests.  A longer option closes the connection."""

MAX_OPTION_REPLY_LENGTH = 64 * 1024
"""(client) Largest option reply payload accepted from a server."""

MAX_OPTIONS = 64
"""Options per handshake; a client haggling longer is dropped."""

MAX_STATUS_CHUNK = 4 + 8 * (1 << 17)
"""(client) Largest non-data structured reply chunk accepted: a BLOCK_STATUS
chunk of 2^17 descriptors (QEMU sends at most 1 MiB of them in one reply)."""

MAX_BLOCK_STATUS_LENGTH = (1 << 32) - (1 << 20)
"""(client) Longest range asked in one NBD_CMD_BLOCK_STATUS: the length field
is 32 bits; keeping it 1 MiB-aligned keeps the pieces aligned too."""

MAX_IN_FLIGHT = 64
"""Requests read and not yet replied to, per connection.  QEMU keeps at
most 16; past this limit the recv thread stops reading (backpressure on the
socket) until replies go out."""

MAX_IN_FLIGHT_BYTES = 256 * 1024 * 1024
"""READ/WRITE payload bytes held for unanswered requests, per connection:
bounds what a peer can make us buffer while the Handler is slow (a request
larger than what is left still proceeds when nothing else is pending)."""

HANDSHAKE_TIMEOUT = 30.0
"""Seconds a client may take over one handshake message."""

DRAIN_TIMEOUT = 10.0
"""Seconds a closing connection waits for its in-flight replies."""

PREFERRED_BLOCK_SIZE = 4096

# ---------------------------------------------------------------------------
# Magic numbers ("Protocol phases", "Transmission").

NBDMAGIC = 0x4E42444D41474943           # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054           # "IHAVEOPT"
OLDSTYLE_MAGIC = 0x00420281861253       # oldstyle negotiation (not supported)
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF     # the server never sends it; the client reads it

# ---------------------------------------------------------------------------
# Wire layouts, one per message, network byte order.

# S: 64 bits, 0x4e42444d41474943 (ASCII 'NBDMAGIC')
# S: 64 bits, 0x49484156454F5054 (ASCII 'IHAVEOPT')
# S: 16 bits, handshake flags
SERVER_GREETING = struct.Struct("!QQH")

# C: 32 bits, client flags
CLIENT_FLAGS = struct.Struct("!I")

# C: 64 bits, 0x49484156454F5054 (ASCII 'IHAVEOPT')
# C: 32 bits, option
# C: 32 bits, length of option data (unsigned)
# C: any data needed for the chosen option, of length as specified above.
OPTION_HEADER = struct.Struct("!QII")

# S: 64 bits, 0x3e889045565a9 (magic number for replies)
# S: 32 bits, the option as sent by the client to which this is a reply
# S: 32 bits, reply type
# S: 32 bits, length of the reply (may be zero)
# S: any data as required by the reply
OPTION_REPLY_HEADER = struct.Struct("!QIII")

# Reply to NBD_OPT_EXPORT_NAME (no option reply header):
# S: 64 bits, size of the export in bytes (unsigned)
# S: 16 bits, transmission flags
# S: 124 bytes, zeroes (reserved) (unless NBD_FLAG_C_NO_ZEROES was negotiated)
EXPORT_NAME_REPLY = struct.Struct("!QH")
EXPORT_NAME_PADDING = bytes(124)

# NBD_OPT_INFO / NBD_OPT_GO data:
# C: 32 bits, length of name (unsigned); MUST be no larger than the option data length - 6
# C: String: name of the export
# C: 16 bits, number of information requests
# C: 16 bits x n - list of NBD_INFO information requests
NAME_LENGTH = struct.Struct("!I")
INFO_COUNT = struct.Struct("!H")
INFO_REQUEST = struct.Struct("!H")

# NBD_REP_INFO payload, NBD_INFO_EXPORT:
# S: 16 bits, NBD_INFO_EXPORT (0)
# S: 64 bits, size of the export in bytes (unsigned)
# S: 16 bits, transmission flags
INFO_EXPORT = struct.Struct("!HQH")

# NBD_REP_INFO payload, NBD_INFO_BLOCK_SIZE:
# S: 16 bits, NBD_INFO_BLOCK_SIZE (3)
# S: 32 bits, minimum block size
# S: 32 bits, preferred block size
# S: 32 bits, maximum block size
INFO_BLOCK_SIZE = struct.Struct("!HIII")

# C: 32 bits, 0x25609513, magic (NBD_REQUEST_MAGIC)
# C: 16 bits, command flags
# C: 16 bits, type
# C: 64 bits, handle (echoed in the reply; called "cookie" in newer specs)
# C: 64 bits, offset (unsigned)
# C: 32 bits, length (unsigned)
# C: (*length* bytes of data if the request is of type NBD_CMD_WRITE)
REQUEST_HEADER = struct.Struct("!IHHQQI")

# S: 32 bits, 0x67446698, magic (NBD_SIMPLE_REPLY_MAGIC)
# S: 32 bits, error (MAY be zero)
# S: 64 bits, handle
# S: (*length* bytes of data if the request is of type NBD_CMD_READ and error is zero)
SIMPLE_REPLY_HEADER = struct.Struct("!IIQ")

# First 32 bits of any server reply, to tell simple from structured.
REPLY_MAGIC = struct.Struct("!I")

# "Structured reply chunk message":
# S: 32 bits, 0x668e33ef, magic (NBD_STRUCTURED_REPLY_MAGIC)
# S: 16 bits, flags
# S: 16 bits, type
# S: 64 bits, handle
# S: 32 bits, length of payload (unsigned)
# Its first 16 bytes are read as a simple reply header is; LENGTH follows.
STRUCTURED_REPLY_HEADER = struct.Struct("!IHHQ")
CHUNK_LENGTH = struct.Struct("!I")

# NBD_REPLY_TYPE_OFFSET_DATA: 64 bits offset, then length - 8 bytes of data.
OFFSET_DATA = struct.Struct("!Q")
# NBD_REPLY_TYPE_OFFSET_HOLE: 64 bits offset, 32 bits hole size (non-zero).
OFFSET_HOLE = struct.Struct("!QI")
# NBD_REPLY_TYPE_BLOCK_STATUS: 32 bits metadata context id, then descriptors
# of 32 bits length (non-zero) and 32 bits status flags.
BLOCK_STATUS_CONTEXT = struct.Struct("!I")
BLOCK_DESCRIPTOR = struct.Struct("!II")
# Error chunks (type bit 15): 32 bits error, 16 bits message length, message
# (NBD_REPLY_TYPE_ERROR_OFFSET: then 64 bits offset).
CHUNK_ERROR = struct.Struct("!IH")

# NBD_REP_META_CONTEXT: 32 bits context id, then the context name.
META_CONTEXT_ID = struct.Struct("!I")
# NBD_OPT_SET_META_CONTEXT data: 32 bits export name length, name, 32 bits
# number of queries, then each query as 32 bits length + string.
META_LENGTH = struct.Struct("!I")

# ---------------------------------------------------------------------------
# Values ("Values" section of the spec).


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class OptionReply(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9


OPTION_REPLY_ERROR_BIT = 1 << 31


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class ReplyFlag(enum.IntFlag):
    DONE = 1 << 0


class ReplyType(enum.IntEnum):
    """Structured reply chunk types ("Structured reply types")."""
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


REPLY_TYPE_ERROR_BIT = 1 << 15


class BlockState(enum.IntFlag):
    """``base:allocation`` status flags ("Metadata contexts")."""
    HOLE = 1 << 0   # not allocated: writing may fail with ENOSPC
    ZERO = 1 << 1   # reads as zeroes


BASE_ALLOCATION = "base:allocation"


class CommandFlag(enum.IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class Error(enum.IntEnum):
    """Error values of a reply ("Error values").  They equal Linux errnos."""
    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


def to_nbd_error(err: int) -> Error:
    """Map an errno from a Handler to an NBD error value.

    The spec defines only the values in ``Error``; any other errno
    (ETIMEDOUT, ECONNRESET, ...) becomes EIO, the honest answer for "the
    write did not reach its destination".
    """
    try:
        return Error(err)
    except ValueError:
        return Error.EIO


# Flags each command may carry.  FUA is tolerated everywhere (see the module
# docstring); NO_HOLE only means "do not punch a hole", which a Handler
# without holes satisfies anyway.
ALLOWED_COMMAND_FLAGS = {
    Command.READ: CommandFlag.FUA,
    Command.WRITE: CommandFlag.FUA,
    Command.WRITE_ZEROES: CommandFlag.FUA | CommandFlag.NO_HOLE,
    Command.FLUSH: CommandFlag.FUA,
    Command.DISC: CommandFlag.FUA,
}

SERVER_HANDSHAKE_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
SERVER_TRANSMISSION_FLAGS = (TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
                             | TransmissionFlag.SEND_WRITE_ZEROES)

# ---------------------------------------------------------------------------
# Errors.


class NBDError(Exception):
    """Root of this module's exceptions."""


class ProtocolError(NBDError):
    """The peer broke the protocol; the connection must be closed."""


class ConnectionClosed(ProtocolError):
    """The peer closed the connection in the middle of a message."""


class OptionError(NBDError):
    """(client) The server answered an option with an error reply."""

    def __init__(self, option: int, reply: int, message: str = ""):
        self.option = option
        self.reply = reply
        self.message = message
        super().__init__(f"server refused {_name(Option, option)}: "
                         f"{_name(OptionReply, reply)} {message!r}")


class RequestError(NBDError):
    """One request failed; reply with ``error`` and carry on.

    On the client side: the server answered the request with ``error``.
    """

    def __init__(self, error: int, message: str):
        self.error = error
        super().__init__(f"{_name(Error, error)}: {message}")


def _name(enum_class, value: int) -> str:
    try:
        return enum_class(value).name
    except ValueError:
        return f"{value:#x}"


# ---------------------------------------------------------------------------
# Blocking socket glue shared by server and client.  protocol.py has its own
# two loops like these: each module imports nothing of the other, so either
# can be taken alone (nbd.py into another NBD tool, protocol.py into another
# implementation of the replication protocol).


def recv_into_exactly(sock: socket.socket, view: memoryview, what: str) -> None:
    """Fill ``view`` from ``sock``; ConnectionClosed if the peer closes first."""
    got = 0
    total = len(view)
    while got < total:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionClosed(f"peer closed the connection after {got} of "
                                   f"{total} bytes of {what}")
        got += n


def recv_exactly(sock: socket.socket, size: int, what: str) -> bytearray:
    buf = bytearray(size)
    recv_into_exactly(sock, memoryview(buf), what)
    return buf


def send_parts(sock: socket.socket, parts) -> None:
    """Send several buffers with as few system calls as possible."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            first = len(views[0])
            if sent >= first:
                sent -= first
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def parse_address(text: str) -> Address:
    """``/path/to.sock`` (anything with a ``/``) -> unix path;
    ``host:port`` or ``[v6addr]:port`` -> ``(host, port)``."""
    if "/" in text:
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"address {text!r}, expected a unix socket path or HOST:PORT")
    return host.strip("[]"), int(port)


def _family(address: Address) -> int:
    return socket.AF_UNIX if isinstance(address, str) else socket.AF_INET6 \
        if ":" in address[0] else socket.AF_INET


# ---------------------------------------------------------------------------
# Server.


class Handler:
    """What the server asks of the export's owner (the agent implements it).

    The server calls these methods from the connection's recv thread, one at
    a time, in the order the requests arrived; the agent relies on that
    order.  Each request is answered by calling ``reply`` exactly once, from
    any thread, possibly before the method returns: ``reply(0)`` for
    success, ``reply(errno)`` for failure (an errno outside the NBD set is
    sent as EIO).  A method that raises without having replied gets EIO.

    Offsets and lengths are already checked: ``offset + length`` lies within
    the export, and ``length`` is at most ``MAX_REQUEST_LENGTH`` for reads
    and writes.  ``data`` is a memoryview over a buffer owned by this
    request alone; it stays valid after the method returns.

    A method must not block for long: the thread calling it is the
    connection's only reader.  Hand slow work to another thread and call
    ``reply`` from there.

    The defaults raise NotImplementedError, so an unimplemented command is
    answered EIO.
    """

    def write(self, offset: int, data: memoryview, reply: Callable[[int], None]) -> None:
        raise NotImplementedError("write")

    def write_zeroes(self, offset: int, length: int, reply: Callable[[int], None]) -> None:
        raise NotImplementedError("write_zeroes")

    def flush(self, reply: Callable[[int], None]) -> None:
        raise NotImplementedError("flush")

    def read(self, offset: int, length: int,
             reply: Callable[[int, "bytes | memoryview | None"], None]) -> None:
        """Reply ``reply(0, data)`` with exactly ``length`` bytes, or ``reply(errno)``."""
        raise NotImplementedError("read")


class _Reply:
    """The ``reply`` callable handed to the Handler for one request.

    Runs in any thread.  The first call sends the simple reply; later calls
    are a Handler bug, logged at ERROR and ignored.
    """

    __slots__ = ("conn", "command", "handle", "offset", "length", "cost", "done")

    def __init__(self, conn: "_Connection", command: int, handle: int,
                 offset: int, length: int, cost: int):
        self.conn = conn
        self.command = command
        self.handle = handle
        self.offset = offset
        self.length = length
        self.cost = cost
        self.done = False

    def __call__(self, error: int, data=None) -> None:
        with self.conn.reply_lock:
            if self.done:
                log.error("%s: reply(%s) called twice for %s handle=%#x",
                          self.conn.name, error, _name(Command, self.command), self.handle)
                return
            self.done = True
        if error == 0 and self.command == Command.READ:
            if data is None or len(data) != self.length:
                log.error("%s: READ handle=%#x off=%d len=%d answered with %s bytes; "
                          "sending EIO", self.conn.name, self.handle, self.offset,
                          self.length, None if data is None else len(data))
                error, data = Error.EIO, None
        else:
            data = None
        self.conn.send_reply(self.command, self.handle, to_nbd_error(error), data, self.cost)


class _Connection:
    """One client connection: the handshake, then the transmission loop.

    ``run`` is the body of the connection's own recv thread; ``send_reply``
    runs in any thread.
    """

    def __init__(self, server: "NBDServer", sock: socket.socket, number: int, peer: str):
        self.server = server
        self.sock = sock
        self.name = f"nbd-conn-{server.export_name}-{number}"
        self.peer = peer
        self.send_lock = threading.Lock()
        self.reply_lock = threading.Lock()
        self.closed = False              # set under send_lock; later replies are dropped
        self.in_flight = 0
        self.in_flight_bytes = 0
        self.in_flight_changed = threading.Condition(threading.Lock())
        self.no_zeroes = False
        self.thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self.handlers = {
            Command.READ: self.on_READ,
            Command.WRITE: self.on_WRITE,
            Command.WRITE_ZEROES: self.on_WRITE_ZEROES,
            Command.FLUSH: self.on_FLUSH,
        }
        self.option_handlers = {
            Option.EXPORT_NAME: self.on_OPT_EXPORT_NAME,
            Option.ABORT: self.on_OPT_ABORT,
            Option.LIST: self.on_OPT_LIST,
            Option.INFO: self.on_OPT_INFO,
            Option.GO: self.on_OPT_GO,
        }

    # -- life cycle (recv thread) ------------------------------------------

    def run(self) -> None:
        """Recv thread: handshake, serve requests, close."""
        log.info("%s: connected from %s", self.name, self.peer)
        try:
            if self.handshake():
                self.transmission()
        except ConnectionClosed as err:
            log.warning("%s: %s", self.name, err)
        except ProtocolError as err:
            log.warning("%s: protocol error, closing: %s", self.name, err)
        except OSError as err:
            if not self.server.stopping.is_set():
                log.warning("%s: socket error, closing: %s", self.name, err)
        except Exception:                       # never let a bug kill the server silently
            log.exception("%s: unexpected error, closing", self.name)
        finally:
            self.close()
            self.server._forget(self)
            log.info("%s: closed", self.name)

    def close(self) -> None:
        """Wait (bounded) for in-flight replies, then close the socket."""
        self.wait_drained(DRAIN_TIMEOUT)
        if self.in_flight:
            log.warning("%s: closing with %d replies still pending; they will be dropped",
                        self.name, self.in_flight)
        self.abort()
        self.sock.close()

    def wait_drained(self, timeout: float) -> bool:
        """True once no reply is pending; False on timeout or abort()."""
        with self.in_flight_changed:
            self.in_flight_changed.wait_for(lambda: self.in_flight == 0 or self.closed, timeout)
            return self.in_flight == 0

    def abort(self) -> None:
        """Any thread: drop pending replies from now on and shut the socket."""
        with self.send_lock:
            self.closed = True
        with self.in_flight_changed:
            self.in_flight_changed.notify_all()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- handshake (recv thread) -------------------------------------------

    def handshake(self) -> bool:
        """Fixed newstyle negotiation.  True when transmission begins.

        Each ``on_OPT_*`` method answers one option and returns None to go on
        haggling, True to enter transmission, False to close (NBD_OPT_ABORT).
        Options without a method get NBD_REP_ERR_UNSUP -- among them
        NBD_OPT_STRUCTURED_REPLY, so the client falls back to simple replies.
        """
        self.sock.settimeout(HANDSHAKE_TIMEOUT)
        self.sock.sendall(SERVER_GREETING.pack(NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS))
        try:
            raw = recv_exactly(self.sock, CLIENT_FLAGS.size, "client flags")
        except ConnectionClosed:
            log.info("%s: peer left before the handshake (a probe?)", self.name)
            return False
        (flags,) = CLIENT_FLAGS.unpack(raw)
        unknown = flags & ~int(SERVER_HANDSHAKE_FLAGS)
        if unknown:
            raise ProtocolError(f"client flags {flags:#x}: unknown bits {unknown:#x}, "
                                f"expected a subset of {int(SERVER_HANDSHAKE_FLAGS):#x}")
        if not flags & ClientFlag.FIXED_NEWSTYLE:
            raise ProtocolError(f"client flags {flags:#x}: NBD_FLAG_C_FIXED_NEWSTYLE "
                                "not set, this server speaks fixed newstyle only")
        self.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            header = recv_exactly(self.sock, OPTION_HEADER.size, "option header")
            magic, option, length = OPTION_HEADER.unpack(header)
            if magic != IHAVEOPT:
                raise ProtocolError(f"option magic {magic:#x}, expected {IHAVEOPT:#x}")
            if length > MAX_OPTION_LENGTH:
                raise ProtocolError(f"{_name(Option, option)} length {length}, "
                                    f"expected at most {MAX_OPTION_LENGTH}")
            data = bytes(recv_exactly(self.sock, length, "option data"))
            log.debug("%s: --> OPT %s len=%d", self.name, _name(Option, option), length)
            handler = self.option_handlers.get(option)
            if handler is None:
                self.send_option_reply(option, OptionReply.ERR_UNSUP,
                                       b"not supported by this server")
                continue
            outcome = handler(option, data)
            if outcome is not None:
                return outcome
        raise ProtocolError(f"more than {MAX_OPTIONS} options in one handshake")

    def send_option_reply(self, option: int, reply: OptionReply, data: bytes = b"") -> None:
        log.debug("%s: <-- OPT %s %s len=%d", self.name, _name(Option, option),
                  reply.name, len(data))
        send_parts(self.sock, [OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option,
                                                        reply, len(data)), data])

    def decode_name(self, option: int, raw: bytes) -> str | None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.send_option_reply(option, OptionReply.ERR_INVALID, b"export name is not UTF-8")
            return None

    def on_OPT_EXPORT_NAME(self, option: int, data: bytes) -> bool:
        name = data.decode("utf-8", "replace")
        if name not in (self.server.export_name, ""):
            # The spec: no error reply exists for this option; terminate.
            raise ProtocolError(f"NBD_OPT_EXPORT_NAME {name!r}, expected "
                                f"{self.server.export_name!r}")
        reply = EXPORT_NAME_REPLY.pack(self.server.size, SERVER_TRANSMISSION_FLAGS)
        send_parts(self.sock, [reply, b"" if self.no_zeroes else EXPORT_NAME_PADDING])
        log.debug("%s: <-- EXPORT_NAME size=%d", self.name, self.server.size)
        return True

    def on_OPT_ABORT(self, option: int, data: bytes) -> bool:
        try:
            self.send_option_reply(option, OptionReply.ACK)
        except OSError:
            pass                                # the client need not wait for the ACK
        return False

    def on_OPT_LIST(self, option: int, data: bytes) -> None:
        if data:
            self.send_option_reply(option, OptionReply.ERR_INVALID, b"NBD_OPT_LIST takes no data")
            return None
        name = self.server.export_name.encode()
        self.send_option_reply(option, OptionReply.SERVER, NAME_LENGTH.pack(len(name)) + name)
        self.send_option_reply(option, OptionReply.ACK)
        return None

    def on_OPT_INFO(self, option: int, data: bytes):
        return self.info_or_go(option, data)

    def on_OPT_GO(self, option: int, data: bytes):
        return self.info_or_go(option, data)

    def info_or_go(self, option: int, data: bytes):
        """NBD_OPT_INFO and NBD_OPT_GO share a layout (see NAME_LENGTH).

        Returns True to enter transmission (GO succeeded), None to go on
        haggling.
        """
        if len(data) < NAME_LENGTH.size + INFO_COUNT.size:
            self.send_option_reply(option, OptionReply.ERR_INVALID,
                                   f"option data {len(data)} bytes, expected at least 6".encode())
            return None
        (name_length,) = NAME_LENGTH.unpack_from(data, 0)
        count_at = NAME_LENGTH.size + name_length
        if name_length > MAX_STRING_LENGTH or count_at + INFO_COUNT.size > len(data):
            self.send_option_reply(option, OptionReply.ERR_INVALID,
                                   f"name length {name_length} does not fit in "
                                   f"{len(data)} bytes of option data".encode())
            return None
        (count,) = INFO_COUNT.unpack_from(data, count_at)
        expected = count_at + INFO_COUNT.size + count * INFO_REQUEST.size
        if expected != len(data):
            self.send_option_reply(option, OptionReply.ERR_INVALID,
                                   f"{count} information requests need {expected} bytes, "
                                   f"got {len(data)}".encode())
            return None
        requests = {INFO_REQUEST.unpack_from(data, count_at + INFO_COUNT.size + 2 * i)[0]
                    for i in range(count)}
        name = self.decode_name(option, data[NAME_LENGTH.size:count_at])
        if name is None:
            return None
        if name not in (self.server.export_name, ""):
            self.send_option_reply(option, OptionReply.ERR_UNKNOWN,
                                   f"no export named {name!r}".encode())
            return None
        self.send_option_reply(option, OptionReply.INFO, INFO_EXPORT.pack(
            Info.EXPORT, self.server.size, SERVER_TRANSMISSION_FLAGS))
        if Info.BLOCK_SIZE in requests:
            self.send_option_reply(option, OptionReply.INFO, INFO_BLOCK_SIZE.pack(
                Info.BLOCK_SIZE, 1, PREFERRED_BLOCK_SIZE, MAX_REQUEST_LENGTH))
        self.send_option_reply(option, OptionReply.ACK)
        return True if option == Option.GO else None

    # -- transmission (recv thread) ----------------------------------------

    def transmission(self) -> None:
        """Read requests one after another until DISC, EOF or stop()."""
        self.sock.settimeout(None)
        log.info("%s: transmission, export %r size=%d", self.name,
                 self.server.export_name, self.server.size)
        header = bytearray(REQUEST_HEADER.size)
        view = memoryview(header)
        while not self.server.stopping.is_set():
            n = self.sock.recv_into(view)
            if n == 0:
                log.debug("%s: --> EOF", self.name)
                return
            if n < len(header):
                recv_into_exactly(self.sock, view[n:], "request header")
            magic, flags, command, handle, offset, length = REQUEST_HEADER.unpack(header)
            if magic != REQUEST_MAGIC:
                raise ProtocolError(f"request magic {magic:#x}, expected {REQUEST_MAGIC:#x}")
            if command == Command.DISC:
                log.debug("%s: --> DISC", self.name)
                return
            self.handlers.get(command, self.on_unsupported)(command, flags, handle,
                                                            offset, length)

    def begin(self, command: int, handle: int, offset: int, length: int,
              cost: int = 0) -> "_Reply":
        """Count a request in flight and return its reply callable.

        Waits while MAX_IN_FLIGHT requests or MAX_IN_FLIGHT_BYTES of
        payload are pending (backpressure: the socket is not read
        meanwhile).  ``cost`` is the payload this request holds in memory.
        """
        with self.in_flight_changed:
            while self.in_flight >= MAX_IN_FLIGHT or (
                    self.in_flight and self.in_flight_bytes + cost > MAX_IN_FLIGHT_BYTES):
                if self.server.stopping.is_set() or self.closed:
                    raise ConnectionClosed("connection closing with requests in flight")
                self.in_flight_changed.wait(1.0)
            self.in_flight += 1
            self.in_flight_bytes += cost
        return _Reply(self, command, handle, offset, length, cost)

    def refuse(self, reply: "_Reply", error: Error, why: str) -> None:
        log.warning("%s: %s handle=%#x off=%d len=%d refused with %s: %s", self.name,
                    _name(Command, reply.command), reply.handle, reply.offset, reply.length,
                    error.name, why)
        reply(error)

    def check(self, command: Command, flags: int, offset: int, length: int,
              past_end: Error) -> None:
        """Raise RequestError for bad flags or a range outside the export."""
        unknown = flags & ~int(ALLOWED_COMMAND_FLAGS[command])
        if unknown:
            raise RequestError(Error.EINVAL, f"flags {flags:#x}: bits {unknown:#x} not "
                               f"allowed on {command.name}")
        if offset + length > self.server.size:
            raise RequestError(past_end, f"off={offset} len={length} runs past the "
                               f"export size {self.server.size}")

    def call_handler(self, method, reply: "_Reply", *args) -> None:
        """Call a Handler method; an exception before reply() becomes EIO."""
        try:
            method(*args, reply)
        except Exception as err:
            if not reply.done:
                log.warning("%s: handler %s raised %r; replying EIO", self.name,
                            method.__name__, err)
                reply(Error.EIO)
            else:
                log.exception("%s: handler %s raised after replying", self.name,
                              method.__name__)

    def on_READ(self, command: int, flags: int, handle: int, offset: int, length: int) -> None:
        log.debug("%s: --> READ handle=%#x off=%d len=%d", self.name, handle, offset, length)
        if length > MAX_REQUEST_LENGTH:
            self.refuse(self.begin(command, handle, offset, length), Error.EINVAL,
                        f"len={length}, expected at most {MAX_REQUEST_LENGTH}")
            return
        reply = self.begin(command, handle, offset, length, cost=length)
        try:
            self.check(Command.READ, flags, offset, length, Error.EINVAL)
        except RequestError as err:
            self.refuse(reply, Error(err.error), str(err))
            return
        self.call_handler(self.server.handler.read, reply, offset, length)

    def on_WRITE(self, command: int, flags: int, handle: int, offset: int, length: int) -> None:
        log.debug("%s: --> WRITE handle=%#x off=%d len=%d", self.name, handle, offset, length)
        if length > MAX_REQUEST_LENGTH:
            # The payload follows the header; we will not read (or skip) more
            # than MAX_REQUEST_LENGTH, so the stream cannot be resynchronised.
            raise ProtocolError(f"WRITE len={length}, expected at most {MAX_REQUEST_LENGTH}")
        reply = self.begin(command, handle, offset, length, cost=length)
        payload = bytearray(length)
        try:
            recv_into_exactly(self.sock, memoryview(payload), "WRITE payload")
        except BaseException:
            # The payload never arrived: no reply is owed, so the request is not
            # in flight (close() would otherwise wait DRAIN_TIMEOUT for it).
            reply.done = True
            with self.in_flight_changed:
                self.in_flight -= 1
                self.in_flight_bytes -= length
                self.in_flight_changed.notify_all()
            raise
        try:
            self.check(Command.WRITE, flags, offset, length, Error.ENOSPC)
        except RequestError as err:
            self.refuse(reply, Error(err.error), str(err))
            return
        self.call_handler(self.server.handler.write, reply, offset, memoryview(payload))

    def on_WRITE_ZEROES(self, command: int, flags: int, handle: int, offset: int,
                        length: int) -> None:
        log.debug("%s: --> WRITE_ZEROES handle=%#x off=%d len=%d flags=%#x", self.name,
                  handle, offset, length, flags)
        reply = self.begin(command, handle, offset, length)
        try:
            self.check(Command.WRITE_ZEROES, flags, offset, length, Error.ENOSPC)
        except RequestError as err:
            self.refuse(reply, Error(err.error), str(err))
            return
        self.call_handler(self.server.handler.write_zeroes, reply, offset, length)

    def on_FLUSH(self, command: int, flags: int, handle: int, offset: int, length: int) -> None:
        log.debug("%s: --> FLUSH handle=%#x", self.name, handle)
        reply = self.begin(command, handle, 0, 0)
        try:
            self.check(Command.FLUSH, flags, 0, 0, Error.EINVAL)
        except RequestError as err:
            self.refuse(reply, Error(err.error), str(err))
            return
        self.call_handler(self.server.handler.flush, reply)

    def on_unsupported(self, command: int, flags: int, handle: int, offset: int,
                       length: int) -> None:
        """TRIM, CACHE, BLOCK_STATUS, ... and unknown types: not advertised, EINVAL.

        The spec has the client send a payload only with WRITE, so the
        stream stays in step.
        """
        log.debug("%s: --> %s handle=%#x off=%d len=%d", self.name,
                  _name(Command, command), handle, offset, length)
        self.refuse(self.begin(command, handle, offset, length), Error.EINVAL,
                    f"command {_name(Command, command)} not advertised by this server")

    # -- replies (any thread) ------------------------------------------------

    def send_reply(self, command: int, handle: int, error: Error, data, cost: int) -> None:
        """Send one simple reply under the send lock; any thread.

        After the connection closed the reply is dropped quietly: the client
        is gone and will re-send what it did not see answered.
        """
        try:
            with self.send_lock:
                if self.closed:
                    log.debug("%s: <-- %s handle=%#x dropped: connection closed",
                              self.name, _name(Command, command), handle)
                    return
                log.debug("%s: <-- %s handle=%#x error=%s", self.name,
                          _name(Command, command), handle, error.name)
                header = SIMPLE_REPLY_HEADER.pack(SIMPLE_REPLY_MAGIC, error, handle)
                try:
                    if data is None:
                        self.sock.sendall(header)
                    else:
                        send_parts(self.sock, (header, data))
                except OSError as err:
                    # A half-sent reply leaves the stream unusable: close it.
                    self.closed = True
                    log.warning("%s: sending reply for handle=%#x failed, closing: %s",
                                self.name, handle, err)
                    try:
                        self.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        finally:
            with self.in_flight_changed:
                self.in_flight -= 1
                self.in_flight_bytes -= cost
                self.in_flight_changed.notify_all()

    def shutdown_read(self) -> None:
        """Any thread: wake the recv thread; in-flight replies can still go out."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass


class NBDServer:
    """Serves one export (a name and a size) to any number of connections.

    ``address`` is a unix socket path or a TCP ``(host, port)``; port 0 picks
    a free port (see ``address`` after ``start()``).  Every request goes to
    ``handler`` (see ``Handler``).  Use ``start()`` / ``stop()``, or ``with``;
    a stopped server stays stopped (make a new one to serve again).
    """

    def __init__(self, address: Address, export_name: str, size: int, handler: Handler,
                 socket_mode: int | None = None):
        if size < 0:
            raise ValueError(f"export size {size}, expected >= 0")
        if len(export_name.encode()) > MAX_STRING_LENGTH:
            raise ValueError(f"export name of {len(export_name.encode())} bytes, "
                             f"expected at most {MAX_STRING_LENGTH}")
        self.address = address
        self.export_name = export_name
        self.size = size
        self.handler = handler
        self.socket_mode = socket_mode   # a unix socket's mode, set before it listens
        self.stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)

    def __enter__(self) -> "NBDServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def connection_count(self) -> int:
        with self._lock:
            return len(self._connections)

    def start(self) -> None:
        """Bind, listen and start the accept thread (caller's thread)."""
        family = _family(self.address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_UNIX:
                _remove_stale_socket(self.address)
            else:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(self.address)
            if family == socket.AF_UNIX and self.socket_mode is not None:
                os.chmod(self.address, self.socket_mode)   # nobody else connects, ever
            sock.listen(16)
        except OSError:
            sock.close()
            raise
        if family != socket.AF_UNIX:
            self.address = sock.getsockname()[:2]
        self._listener = sock
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"nbd-accept-{self.export_name}", daemon=True)
        self._accept_thread.start()
        log.info("NBD export %r size=%d listening on %s", self.export_name, self.size,
                 self.address)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, let in-flight replies go out (bounded), close all.

        Runs in the caller's thread.  Replies a Handler sends after its
        connection closed are dropped quietly.
        """
        if self.stopping.is_set() or self._listener is None:
            return
        self.stopping.set()
        log.info("NBD export %r stopping", self.export_name)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)   # wakes accept() on Linux
        except OSError:
            pass
        self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            conn.shutdown_read()
        deadline = time.monotonic() + timeout
        for conn in connections:
            if not conn.wait_drained(max(0.0, deadline - time.monotonic())):
                log.warning("%s: %d replies still pending at stop; dropping them",
                            conn.name, conn.in_flight)
            conn.abort()
        for conn in connections:
            conn.thread.join(max(0.1, deadline - time.monotonic()))
            if conn.thread.is_alive():
                log.warning("%s did not stop within %.1fs", conn.name, timeout)
        if isinstance(self.address, str):
            try:
                os.unlink(self.address)
            except OSError:
                pass
        log.info("NBD export %r stopped", self.export_name)

    def _accept_loop(self) -> None:
        """Accept thread: one recv thread per new connection."""
        listener = self._listener
        while not self.stopping.is_set():
            try:
                sock, peer = listener.accept()
            except OSError as err:
                if self.stopping.is_set():
                    return
                if err.errno in ACCEPT_RETRY_ERRNOS:
                    # Out of descriptors or memory, or a client gave up while
                    # queued: QEMU will reconnect, so keep listening.
                    log.warning("NBD export %r: accept failed, retrying: %s",
                                self.export_name, err)
                    self.stopping.wait(0.1)
                    continue
                log.error("NBD export %r: accept failed, no longer accepting: %s",
                          self.export_name, err)
                return
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, REPLY_SEND_BUFFER)
            conn = _Connection(self, sock, next(self._numbers), str(peer) or "unix")
            with self._lock:
                if self.stopping.is_set():
                    sock.close()
                    return
                self._connections.add(conn)
            conn.thread.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.discard(conn)


ACCEPT_RETRY_ERRNOS = frozenset({errno.ECONNABORTED, errno.EMFILE, errno.ENFILE,
                                 errno.ENOBUFS, errno.ENOMEM, errno.EPROTO})


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file left by an earlier run; refuse anything else.

    A socket something still listens on is in use, not stale.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
            return
    raise FileExistsError(errno.EADDRINUSE, "a server is listening on this socket", path)


# ---------------------------------------------------------------------------
# Client.


class NBDClient:
    """A synchronous, blocking NBD client: one request at a time.

    Connects to ``address`` (unix path or ``(host, port)``), negotiates fixed
    newstyle with NBD_OPT_GO (falling back to NBD_OPT_EXPORT_NAME for old
    servers) and simple replies.  Thread-safe by serialisation: a lock lets
    one request at a time on the wire, so threads may share a client but do
    not run in parallel; open one client per thread for parallel reads.

    With ``block_status=True`` it first asks for structured replies and the
    ``base:allocation`` metadata context; if the server grants both,
    ``can_block_status`` is true and ``block_status`` tells data from holes
    and zeroes.  READ then takes structured replies too (``structured``).

    Requests longer than the server's maximum block size are split.
    Server errors raise ``RequestError`` (the connection stays usable);
    protocol violations raise ``ProtocolError`` (the client is closed).
    """

    def __init__(self, address: Address, export_name: str = "", timeout: float | None = 60.0,
                 block_status: bool = False):
        self.address = address
        self.export_name = export_name
        self.size = 0
        self.transmission_flags = TransmissionFlag(0)
        self.max_block = MAX_REQUEST_LENGTH
        self.structured = False
        self.meta_context: int | None = None    # base:allocation's id, once granted
        self._lock = threading.Lock()
        self._handles = itertools.count(1)
        self._header = bytearray(SIMPLE_REPLY_HEADER.size)
        self._buffer = bytearray(0)
        self._sock = socket.socket(_family(address), socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(address)
            if self._sock.family != socket.AF_UNIX:
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._handshake(block_status)
        except BaseException:
            self._sock.close()
            raise

    @property
    def can_block_status(self) -> bool:
        return self.meta_context is not None

    def __enter__(self) -> "NBDClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- handshake -----------------------------------------------------------

    def _handshake(self, block_status: bool) -> None:
        greeting = recv_exactly(self._sock, SERVER_GREETING.size, "server greeting")
        magic, opt_magic, flags = SERVER_GREETING.unpack(greeting)
        if magic != NBDMAGIC:
            raise ProtocolError(f"server magic {magic:#x}, expected {NBDMAGIC:#x}")
        if opt_magic == OLDSTYLE_MAGIC:
            raise ProtocolError("server speaks oldstyle negotiation, expected newstyle")
        if opt_magic != IHAVEOPT:
            raise ProtocolError(f"server option magic {opt_magic:#x}, expected {IHAVEOPT:#x}")
        if not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise ProtocolError(f"handshake flags {flags:#x}: server does not speak "
                                "fixed newstyle")
        client_flags = ClientFlag.FIXED_NEWSTYLE
        if flags & HandshakeFlag.NO_ZEROES:
            client_flags |= ClientFlag.NO_ZEROES
        self._sock.sendall(CLIENT_FLAGS.pack(client_flags))
        if block_status:
            self._negotiate_block_status()
        try:
            self._go()
        except OptionError as err:
            if err.reply != OptionReply.ERR_UNSUP:
                raise
            self._export_name(no_zeroes=bool(client_flags & ClientFlag.NO_ZEROES))

    def _send_option(self, option: Option, data: bytes) -> None:
        log.debug("client: --> OPT %s len=%d", option.name, len(data))
        send_parts(self._sock, [OPTION_HEADER.pack(IHAVEOPT, option, len(data)), data])

    def _recv_option_reply(self, option: Option) -> tuple[int, bytes]:
        header = recv_exactly(self._sock, OPTION_REPLY_HEADER.size, "option reply header")
        magic, echoed, reply, length = OPTION_REPLY_HEADER.unpack(header)
        if magic != OPTION_REPLY_MAGIC:
            raise ProtocolError(f"option reply magic {magic:#x}, expected "
                                f"{OPTION_REPLY_MAGIC:#x}")
        if echoed != option:
            raise ProtocolError(f"option reply for {_name(Option, echoed)}, expected "
                                f"{option.name}")
        if length > MAX_OPTION_REPLY_LENGTH:
            raise ProtocolError(f"option reply length {length}, expected at most "
                                f"{MAX_OPTION_REPLY_LENGTH}")
        data = bytes(recv_exactly(self._sock, length, "option reply data"))
        log.debug("client: <-- OPT %s %s len=%d", option.name, _name(OptionReply, reply), length)
        return reply, data

    def _negotiate_block_status(self) -> None:
        """NBD_OPT_STRUCTURED_REPLY, then NBD_OPT_SET_META_CONTEXT base:allocation.

        A refusal of either is not an error: the client goes on without
        block status (a server without it has every byte as data).
        """
        self._send_option(Option.STRUCTURED_REPLY, b"")
        reply, data = self._recv_option_reply(Option.STRUCTURED_REPLY)
        if reply != OptionReply.ACK:
            log.debug("client: no structured replies (%s %r)", _name(OptionReply, reply), data)
            return
        self.structured = True
        name = self.export_name.encode()
        query = BASE_ALLOCATION.encode()
        self._send_option(Option.SET_META_CONTEXT,
                          META_LENGTH.pack(len(name)) + name + META_LENGTH.pack(1)
                          + META_LENGTH.pack(len(query)) + query)
        while True:
            reply, data = self._recv_option_reply(Option.SET_META_CONTEXT)
            if reply == OptionReply.ACK or reply & OPTION_REPLY_ERROR_BIT:
                break
            if reply == OptionReply.META_CONTEXT and len(data) > META_CONTEXT_ID.size:
                (context,) = META_CONTEXT_ID.unpack_from(data)
                if data[META_CONTEXT_ID.size:] == query:
                    self.meta_context = context
        if self.meta_context is None:
            log.debug("client: server did not select %s", BASE_ALLOCATION)

    def _go(self) -> None:
        """NBD_OPT_GO, asking for NBD_INFO_BLOCK_SIZE too."""
        name = self.export_name.encode()
        self._send_option(Option.GO, NAME_LENGTH.pack(len(name)) + name + INFO_COUNT.pack(1)
                          + INFO_REQUEST.pack(Info.BLOCK_SIZE))
        got_export = False
        while True:
            reply, data = self._recv_option_reply(Option.GO)
            if reply == OptionReply.ACK:
                break
            if reply & OPTION_REPLY_ERROR_BIT:
                raise OptionError(Option.GO, reply, data.decode("utf-8", "replace"))
            if reply != OptionReply.INFO or len(data) < INFO_REQUEST.size:
                continue                        # unknown replies are ignored
            (info,) = INFO_REQUEST.unpack_from(data)
            if info == Info.EXPORT and len(data) == INFO_EXPORT.size:
                _, self.size, flags = INFO_EXPORT.unpack(data)
                self.transmission_flags = TransmissionFlag(flags)
                got_export = True
            elif info == Info.BLOCK_SIZE and len(data) == INFO_BLOCK_SIZE.size:
                _, _, _, maximum = INFO_BLOCK_SIZE.unpack(data)
                if maximum:
                    self.max_block = min(maximum, MAX_REQUEST_LENGTH)
        if not got_export:
            raise ProtocolError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")

    def _export_name(self, no_zeroes: bool) -> None:
        """Fallback for servers without NBD_OPT_GO."""
        self._send_option(Option.EXPORT_NAME, self.export_name.encode())
        data = recv_exactly(self._sock, EXPORT_NAME_REPLY.size, "export name reply")
        self.size, flags = EXPORT_NAME_REPLY.unpack(data)
        self.transmission_flags = TransmissionFlag(flags)
        if not no_zeroes:
            recv_exactly(self._sock, len(EXPORT_NAME_PADDING), "export name padding")

    # -- transmission ----------------------------------------------------------

    def _request(self, command: Command, offset: int, length: int, payload=None,
                 flags: int = 0, into: memoryview | None = None) -> list | None:
        """Send one request and read its reply (caller holds the lock).

        READ data lands in ``into``; BLOCK_STATUS returns its descriptors.
        """
        handle = next(self._handles)
        header = REQUEST_HEADER.pack(REQUEST_MAGIC, flags, command, handle, offset, length)
        try:
            if payload is None:
                self._sock.sendall(header)
            else:
                send_parts(self._sock, (header, payload))
            if self.structured:
                return self._structured_reply(command, handle, offset, length, into)
            recv_into_exactly(self._sock, memoryview(self._header), "reply header")
            self._simple_reply(command, handle, offset, length, into)
            return None
        except (ProtocolError, OSError):
            self._sock.close()
            raise

    def _simple_reply(self, command: Command, handle: int, offset: int, length: int,
                      into: memoryview | None) -> None:
        """The rest of a simple reply whose 16-byte header is in ``self._header``."""
        magic, error, echoed = SIMPLE_REPLY_HEADER.unpack(self._header)
        if magic != SIMPLE_REPLY_MAGIC:
            raise ProtocolError(f"reply magic {magic:#x}, expected {SIMPLE_REPLY_MAGIC:#x}")
        if echoed != handle:
            raise ProtocolError(f"reply handle {echoed:#x}, expected {handle:#x}")
        if error:
            raise RequestError(error, f"{command.name} off={offset} len={length}")
        if into is not None:
            recv_into_exactly(self._sock, into, "READ data")

    def _structured_reply(self, command: Command, handle: int, offset: int, length: int,
                          into: memoryview | None) -> list | None:
        """Read chunks until NBD_REPLY_FLAG_DONE ("Structured reply chunk message").

        A simple reply is allowed for any command but READ.  Content chunks
        must lie inside the request and cover all of it; an error chunk fails
        the request once the reply is complete (the connection stays usable).
        """
        covered = 0
        descriptors = None
        error: RequestError | None = None
        what = f"{command.name} off={offset} len={length}"
        while True:
            recv_into_exactly(self._sock, memoryview(self._header), "reply header")
            (magic,) = REPLY_MAGIC.unpack_from(self._header)
            if magic == SIMPLE_REPLY_MAGIC and command != Command.READ:
                self._simple_reply(command, handle, offset, length, None)
                return descriptors
            if magic != STRUCTURED_REPLY_MAGIC:
                raise ProtocolError(f"reply magic {magic:#x}, expected "
                                    f"{STRUCTURED_REPLY_MAGIC:#x} (structured replies)")
            _, chunk_flags, chunk_type, echoed = STRUCTURED_REPLY_HEADER.unpack(self._header)
            (size,) = CHUNK_LENGTH.unpack(recv_exactly(self._sock, CHUNK_LENGTH.size,
                                                       "chunk length"))
            if echoed != handle:
                raise ProtocolError(f"reply handle {echoed:#x}, expected {handle:#x}")
            reading = command == Command.READ and into is not None
            limit = OFFSET_DATA.size + length if reading and \
                chunk_type == ReplyType.OFFSET_DATA else MAX_STATUS_CHUNK
            if size > limit:       # checked before anything of that size is read
                raise ProtocolError(f"{_name(ReplyType, chunk_type)} chunk of {size} bytes "
                                    f"for {what}, expected at most {limit}")
            if chunk_type == ReplyType.OFFSET_DATA and reading:
                if size <= OFFSET_DATA.size:
                    raise ProtocolError(f"OFFSET_DATA chunk of {size} bytes, expected >= 9")
                (start,) = OFFSET_DATA.unpack(recv_exactly(self._sock, OFFSET_DATA.size,
                                                           "OFFSET_DATA offset"))
                n = size - OFFSET_DATA.size
                if start < offset or start + n > offset + length:
                    raise ProtocolError(f"OFFSET_DATA off={start} len={n} outside {what}")
                recv_into_exactly(self._sock, into[start - offset:start - offset + n],
                                  "READ data")
                covered += n
            else:
                body = recv_exactly(self._sock, size, "chunk payload")
                if chunk_type & REPLY_TYPE_ERROR_BIT:
                    error = error or self._chunk_error(chunk_type, body, what)
                elif chunk_type == ReplyType.OFFSET_HOLE and reading:
                    if size != OFFSET_HOLE.size:
                        raise ProtocolError(f"OFFSET_HOLE chunk of {size} bytes, expected 12")
                    start, n = OFFSET_HOLE.unpack(body)
                    if n == 0 or start < offset or start + n > offset + length:
                        raise ProtocolError(f"OFFSET_HOLE off={start} len={n} outside {what}")
                    into[start - offset:start - offset + n] = bytes(n)
                    covered += n
                elif chunk_type == ReplyType.BLOCK_STATUS and command == Command.BLOCK_STATUS:
                    got = self._descriptors(body, length, what)
                    if got is not None:
                        descriptors = got
                elif chunk_type != ReplyType.NONE or size:
                    raise ProtocolError(f"unexpected {_name(ReplyType, chunk_type)} chunk "
                                        f"({size} bytes) for {what}")
            if chunk_flags & ReplyFlag.DONE:
                break
        if error is not None:
            raise error
        if command == Command.READ and covered != length:
            raise ProtocolError(f"{what}: the chunks cover {covered} bytes, expected {length}")
        if command == Command.BLOCK_STATUS and descriptors is None:
            raise ProtocolError(f"{what}: no BLOCK_STATUS chunk for base:allocation")
        return descriptors

    @staticmethod
    def _chunk_error(chunk_type: int, body: bytes, what: str) -> RequestError:
        if len(body) < CHUNK_ERROR.size:
            raise ProtocolError(f"{_name(ReplyType, chunk_type)} chunk of {len(body)} bytes, "
                                f"expected at least {CHUNK_ERROR.size}")
        error, n = CHUNK_ERROR.unpack_from(body)
        if n > len(body) - CHUNK_ERROR.size:
            raise ProtocolError(f"error chunk message length {n} exceeds its chunk")
        message = bytes(body[CHUNK_ERROR.size:CHUNK_ERROR.size + n]).decode("utf-8", "replace")
        return RequestError(error or Error.EIO, f"{what}: {message}" if message else what)

    def _descriptors(self, body: bytes, length: int, what: str) -> list | None:
        """(length, flags) descriptors of a BLOCK_STATUS chunk for our context,
        cut at the request's end (the last may run past it); None for another context."""
        if len(body) < BLOCK_STATUS_CONTEXT.size + BLOCK_DESCRIPTOR.size \
                or (len(body) - BLOCK_STATUS_CONTEXT.size) % BLOCK_DESCRIPTOR.size:
            raise ProtocolError(f"BLOCK_STATUS chunk of {len(body)} bytes: expected 4 + a "
                                "positive multiple of 8")
        (context,) = BLOCK_STATUS_CONTEXT.unpack_from(body)
        if context != self.meta_context:
            return None
        out, total = [], 0
        for pos in range(BLOCK_STATUS_CONTEXT.size, len(body), BLOCK_DESCRIPTOR.size):
            n, state = BLOCK_DESCRIPTOR.unpack_from(body, pos)
            if n == 0:
                raise ProtocolError(f"{what}: BLOCK_STATUS descriptor of length 0")
            n = min(n, length - total)
            if n <= 0:
                break
            out.append((n, state))
            total += n
        return out

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"off={offset} len={length} outside the export "
                             f"(size {self.size})")

    def readinto(self, offset: int, buf) -> None:
        """Read ``len(buf)`` bytes at ``offset`` straight into ``buf``."""
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        with self._lock:
            for start in range(0, len(view), self.max_block):
                chunk = view[start:start + self.max_block]
                self._request(Command.READ, offset + start, len(chunk), into=chunk)

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset``.

        The data lands in a buffer kept between calls (recv_into, no
        per-call allocation); the one copy is the returned ``bytes``.  Use
        ``readinto`` to avoid it.
        """
        self._check_range(offset, length)
        with self._lock:
            if len(self._buffer) < length:
                self._buffer = bytearray(length)
            view = memoryview(self._buffer)
            for start in range(0, length, self.max_block):
                chunk = view[start:min(length, start + self.max_block)]
                self._request(Command.READ, offset + start, len(chunk), into=chunk)
            return bytes(view[:length])

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """NBD_CMD_BLOCK_STATUS over ``base:allocation``: consecutive (length,
        flags) extents from ``offset``, covering at most ``length`` bytes (the
        server may describe only a prefix).  ``flags`` is ``BlockState``:
        ZERO means the extent reads as zeroes; HOLE alone says nothing of its
        contents."""
        self._check_range(offset, length)
        if not self.can_block_status:
            raise RequestError(Error.ENOTSUP, "base:allocation was not negotiated")
        with self._lock:
            return self._request(Command.BLOCK_STATUS, offset,
                                 min(length, MAX_BLOCK_STATUS_LENGTH))

    def write(self, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        self._check_range(offset, len(view))
        with self._lock:
            for start in range(0, len(view), self.max_block):
                chunk = view[start:start + self.max_block]
                self._request(Command.WRITE, offset + start, len(chunk), payload=chunk)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        if not self.transmission_flags & TransmissionFlag.SEND_WRITE_ZEROES:
            raise RequestError(Error.ENOTSUP, "server did not advertise WRITE_ZEROES")
        with self._lock:
            for start in range(0, length, self.max_block):
                self._request(Command.WRITE_ZEROES, offset + start,
                              min(self.max_block, length - start))

    def flush(self) -> None:
        with self._lock:
            self._request(Command.FLUSH, 0, 0)

    def close(self) -> None:
        """Send NBD_CMD_DISC (best effort) and close the socket."""
        with self._lock:
            if self._sock.fileno() < 0:
                return
            try:
                self._sock.sendall(REQUEST_HEADER.pack(REQUEST_MAGIC, 0, Command.DISC,
                                                       next(self._handles), 0, 0))
            except OSError:
                pass
            self._sock.close()

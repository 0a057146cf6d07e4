"""ember's python3 function runtime.

The guest agent starts it once per function, at template time, as

    python3 -I -u -B /run/ember/runtime/ember_runtime.py <handler_file.py> <handler_name>

in /run/ember/function, with fd 3 the request pipe (read) and fd 4 the
response pipe (write), and for the hot path /dev/mem on fd 5. It maps the
doorbell and closes fd 5, only then makes the function directory
importable and imports the handler, says READY on fd 4, and then serves
one event at a time for ever. The host snapshots the VM while the
runtime waits; every invocation restores a fresh clone that serves exactly
one event. See ../README.md for the handler API and the pipe protocol, and
protocol/src/hotpath.rs for the shared-memory layout.

Started as `ember_runtime.py --wait-for-code` (a per-runtime base
snapshot's runtime), it does all of that but the import: doorbell, hot
path, READY; then it waits for `LOAD <len>\n{"args": [...], "env": [...]}`
on fd 3 (args: the handler's arguments as above), adds `env` to its
environment, imports the handler and says READY again. Every function
template is then made from a clone of the base.

Why the hot path looks the way it does: in ember's test guests every
guest-kernel entry is emulated and costs 0.5-50 ms (a first touch of a page
about 3 ms), while user-mode code runs at native speed. So between ringing
DOORBELL_WAITING and ringing DOORBELL_DONE this runtime makes no system
call and touches no new page on its own account: it spins on memory it
already touched, runs the handler, and writes into memory it already
touched. Everything it needs is built and exercised once at start-up.

Only the standard library is used. Set EMBER_HOT_PATH_TEST=1 (with
EMBER_HOT_PATH=1) to replace the doorbell by a line
`EMBER_DOORBELL <value>` on stderr, for testing on a host.
"""

import sys

# fd 5 is /dev/mem (the doorbell's source): it reaches the guest's physical
# address space, so no code but the standard library's and ours may run
# while it is open. Isolated mode (-I) keeps the script's directory, the
# working directory (the function's) and PYTHON* variables off sys.path, so
# the imports below cannot be shadowed by the function's files. Started any
# other way, fd 5 goes now, before anything else is imported.
if __name__ == "__main__" and not sys.flags.isolated:
    import posix  # built in: found before sys.path is searched

    try:
        posix.close(5)
    except OSError:
        pass

import _thread
import ctypes
import gc
import importlib.machinery
import importlib.util
import inspect
import io
import json
import linecache
import mmap
import os
import random
import stat
import struct
import sys
import time
import traceback

# The pipes must not leave __pycache__ behind in the function directory, and
# the root filesystem is read-only anyway (its stdlib pycs are precompiled).
sys.dont_write_bytecode = True

# --- The layout, mirrored from protocol/src/hotpath.rs ------------------------------
# (test_runtime.py checks these against the Rust source.)

DOORBELL_ADDR = 0xC000_0000
DOORBELL_FD = 5
DOORBELL_WAITING = 1
DOORBELL_DONE = 2
DOORBELL_OUTPUT = 3

REQUEST_MAGIC = int.from_bytes(b"EMRQ", "little")
RESPONSE_MAGIC = int.from_bytes(b"EMRS", "little")
LAYOUT_VERSION = 1

REQUEST_HEADER_LEN = 64
RESPONSE_HEADER_LEN = 64
REQUEST_ENTROPY_LEN = 24
DEFAULT_BUFFER_BYTES = 256 << 10
MAX_BUFFER_BYTES = 16 << 20

REQUEST_FLAG_VIA_PIPE = 1
REQUEST_FLAG_PING = 2
REQUEST_FLAG_STREAM = 4
RESPONSE_FLAG_STDOUT_TRUNCATED = 1
RESPONSE_FLAG_STDERR_TRUNCATED = 2

# Request header offsets.
RQ_MAGIC = 0
RQ_VERSION = 4
RQ_SEQ = 8
RQ_FLAGS = 16
RQ_EVENT_LEN = 20
RQ_TIMEOUT = 24
RQ_TIME = 32
RQ_ENTROPY = 40

# Response header offsets.
RS_MAGIC = 0
RS_VERSION = 4
RS_SEQ = 8
RS_STATUS = 16
RS_RESULT_LEN = 20
RS_STDOUT_LEN = 24
RS_STDERR_LEN = 28
RS_FLAGS = 32
RS_HANDLER_NS = 40

# Response statuses (ResponseStatus::code) and their words on the pipe.
STATUS_JSON = 0
STATUS_BYTES = 1
STATUS_ERROR = 2
STATUS_VIA_PIPE = 3
STATUS_OUTPUT = 4
STATUS_WORDS = {STATUS_JSON: b"json", STATUS_BYTES: b"bytes", STATUS_ERROR: b"error"}

# magic, version, seq, flags, event_len, timeout_ms, (pad), unix_time_ns, entropy
REQUEST_HEADER = struct.Struct("<IIQIII4xQ24s")
# magic, version, seq, status, result_len, stdout_len, stderr_len, flags, (pad),
# handler_ns, (reserved)
RESPONSE_HEADER = struct.Struct("<IIQIIIII4xQ16x")
# What the spin loop reads.
_SEQ = struct.Struct("<Q")
_MAGIC_VERSION = struct.Struct("<II")
assert REQUEST_HEADER.size == REQUEST_HEADER_LEN
assert RESPONSE_HEADER.size == RESPONSE_HEADER_LEN

# --- Runtime limits -----------------------------------------------------------------

PAGE_SIZE = mmap.PAGESIZE
# Captured stdout and stderr, each: small on the hot path so that a
# response usually fits its buffer; the agent applies the invocation's own
# limit on the pipe.
HOT_OUTPUT_CAP = 64 << 10
PIPE_OUTPUT_CAP = 1 << 20
# Streaming (REQUEST_FLAG_STREAM): what is written goes to the host at each
# newline, or once this many characters wait without one. Nothing is kept,
# so the cap is the pipe's: it bounds what one call may send in all.
STREAM_PUSH_CHARS = 4096
STREAM_OUTPUT_CAP = PIPE_OUTPUT_CAP
# Parts of an error object; the traceback keeps its end (the raise).
MAX_ERROR_MESSAGE = 8 << 10
MAX_TRACEBACK = 32 << 10
# Longest pipe header line, newline included.
MAX_HEADER_LINE = 128
# Largest LOAD body (the handler's arguments and environment).
MAX_LOAD_BYTES = 1 << 20


class StartupError(Exception):
    """The function cannot be served; the message says why."""


class ProtocolError(Exception):
    """The agent sent something this runtime cannot parse."""


# --- Capturing print() ----------------------------------------------------------------


class Capture(io.TextIOBase):
    """Stands in for sys.stdout or sys.stderr during one handler call.

    It keeps at most `cap` bytes in memory: no write reaches a file
    descriptor, so print() on the hot path costs no system call. Two
    instances are made at start-up and reset for every call.

    With a `push` callable (streaming), a write that ends a line, or
    leaves STREAM_PUSH_CHARS characters waiting, calls it; it take()s
    what waits and sends it to the host. The cap then bounds everything
    taken during the call, not what is kept.
    """

    encoding = "utf-8"
    errors = "backslashreplace"

    def __init__(self, name):
        super().__init__()
        self.name = name
        self.buffer = _BinaryWriter(self)  # for sys.stdout.buffer.write(b"...")
        self.truncated = False
        self._parts = []
        self._chars = 0  # characters accepted during this call
        self._waiting = 0  # characters in _parts
        self._taken = 0  # bytes take() returned during this call
        self._cap = 0
        self._push = None
        # A handler's threads may print at once; never held while pushing.
        self._lock = _thread.allocate_lock()

    def reset(self, cap, push=None):
        with self._lock:
            self._parts = []
            self._chars = 0
            self._waiting = 0
            self._taken = 0
            self._cap = cap
            self._push = push
            self.truncated = False

    def writable(self):
        return True

    def isatty(self):
        return False

    def close(self):
        # A handler may close sys.stdout; the next call still needs it.
        pass

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        push = None
        with self._lock:
            # Characters are counted here (cheap); take() cuts to bytes.
            room = self._cap - self._chars
            if len(text) > room:
                self.truncated = True
                kept = text[: max(room, 0)]
            else:
                kept = text
            if kept:
                self._parts.append(kept)
                self._chars += len(kept)
                self._waiting += len(kept)
                if self._push is not None and ("\n" in kept or self._waiting >= STREAM_PUSH_CHARS):
                    push = self._push
        if push is not None:
            push()
        return len(text)

    def take(self):
        """What waits, as UTF-8, cut so that this call's takes stay within `cap` bytes."""
        with self._lock:
            parts, self._parts, self._waiting = self._parts, [], 0
            room = self._cap - self._taken
            data = "".join(parts).encode("utf-8", "backslashreplace")
            if len(data) > room:
                # Cut at a character boundary (not inside a multi-byte UTF-8 sequence).
                cut = max(room, 0)
                while cut > 0 and (data[cut] & 0xC0) == 0x80:
                    cut -= 1
                data = data[:cut]
                self.truncated = True
            self._taken += len(data)
            return data


class _BinaryWriter:
    """`Capture.buffer`: bytes written here are kept as (lossily decoded) text."""

    def __init__(self, text):
        self._text = text

    def write(self, data):
        self._text.write(bytes(data).decode("utf-8", "replace"))
        return len(data)

    def flush(self):
        pass


# --- Calling the handler ------------------------------------------------------------------


class Context:
    """The handler's second argument."""

    __slots__ = ("invocation_id", "timeout_ms", "unix_time_ns", "hot_path")

    def __init__(self, invocation_id, timeout_ms, unix_time_ns, hot_path):
        # The request's seq on the hot path, a per-process counter on the pipe.
        self.invocation_id = invocation_id
        # The invocation's time limit; the host (or agent) enforces it.
        self.timeout_ms = timeout_ms
        # The host's clock at the request. Prefer it to time.time(): a
        # clone's own clock may still be the snapshot's.
        self.unix_time_ns = unix_time_ns
        # Whether the event came through shared memory.
        self.hot_path = hot_path

    def __repr__(self):
        return (
            f"Context(invocation_id={self.invocation_id!r}, timeout_ms={self.timeout_ms!r}, "
            f"unix_time_ns={self.unix_time_ns!r}, hot_path={self.hot_path!r})"
        )


class Function:
    """A handler and how to call it."""

    def __init__(self, handler, wants_context=True, is_async=False):
        self.handler = handler
        self.wants_context = wants_context
        self.is_async = is_async

    def call(self, event, context):
        if self.wants_context:
            result = self.handler(event, context)
        else:
            result = self.handler(event)
        if self.is_async:
            # Only imported at start-up for async handlers (see load_function).
            import asyncio

            result = asyncio.run(result)
        return result


def load_function(path, handler_name):
    """Imports the handler file and finds the handler; raises on failure."""
    path = os.path.abspath(path)
    # Register the module under its file's name, so that the handler's own
    # code (pickle, dataclasses, `import <name>` from a sibling module) finds
    # this copy, unless that would replace a module already loaded.
    module_name = os.path.splitext(os.path.basename(path))[0]
    if not module_name.isidentifier() or module_name in sys.modules:
        module_name = "ember_function"
    # An explicit loader accepts any file name, not only *.py.
    loader = importlib.machinery.SourceFileLoader(module_name, path)
    spec = importlib.util.spec_from_file_location(module_name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    handler = getattr(module, handler_name, None)
    if handler is None:
        raise StartupError(f"{os.path.basename(path)} defines no {handler_name!r}")
    if not callable(handler):
        raise StartupError(f"{handler_name!r} in {os.path.basename(path)} is not callable")
    is_async = inspect.iscoroutinefunction(handler)
    if is_async:
        import asyncio  # noqa: F401  (now, not on the first call)
    _cache_source_for_good(path)
    return Function(handler, _wants_context(handler, handler_name), is_async)


def load_module(code_dir, module_name, handler_name):
    """Imports the bundle's handler module and finds the handler; raises on failure.

    The bundle's directory comes first on sys.path, its installed
    dependencies (`.ember-site`, with their .pth files) after the standard
    library, as site-packages would be.
    """
    import site

    sys.path.insert(0, code_dir)
    site_dir = os.path.join(code_dir, ".ember-site")
    if os.path.isdir(site_dir):
        site.addsitedir(site_dir)
    module = importlib.import_module(module_name)
    handler = getattr(module, handler_name, None)
    if handler is None:
        raise StartupError(f"{module_name} defines no {handler_name!r}")
    if not callable(handler):
        raise StartupError(f"{handler_name!r} in {module_name} is not callable")
    is_async = inspect.iscoroutinefunction(handler)
    if is_async:
        import asyncio  # noqa: F401  (now, not on the first call)
    path = getattr(module, "__file__", None)
    if path:
        _cache_source_for_good(path)
    return Function(handler, _wants_context(handler, handler_name), is_async)


def _wants_context(handler, handler_name):
    """Whether to call handler(event, context) or handler(event); decided once."""
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return True  # no signature to inspect (a builtin): assume the full form
    for args, wants in (((None, None), True), ((None,), False)):
        try:
            signature.bind(*args)
            return wants
        except TypeError:
            pass
    raise StartupError(f"{handler_name}{signature} must accept (event) or (event, context)")


def _cache_source_for_good(path):
    """Keeps the handler's source lines in linecache without revalidation.

    Formatting a traceback calls linecache.checkcache, which stats every
    cached file: a system call on each error. The function's files never
    change, and an entry without an mtime is never rechecked.
    """
    if linecache.getlines(path):
        size, _mtime, lines, fullname = linecache.cache[path]
        linecache.cache[path] = (size, None, lines, fullname)


def decode_event(data):
    """The handler's event: JSON if the bytes are UTF-8 JSON, else the bytes."""
    if not data:
        return None
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return data


class Response:
    """One handler call's outcome, encoded."""

    __slots__ = ("status", "result", "stdout", "stderr", "flags", "handler_ns")

    def __init__(self, status, result, stdout=b"", stderr=b"", flags=0, handler_ns=0):
        self.status = status
        self.result = result
        self.stdout = stdout
        self.stderr = stderr
        self.flags = flags
        # How long the handler ran (0: not measured).
        self.handler_ns = handler_ns

    def __repr__(self):
        return (
            f"Response(status={self.status}, result={self.result!r}, stdout={self.stdout!r}, "
            f"stderr={self.stderr!r}, flags={self.flags}, handler_ns={self.handler_ns})"
        )


# Compact JSON; strict (NaN and Infinity are not JSON). Made once.
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_JSON_ASCII = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def encode_result(result):
    """(status, bytes) for what the handler returned."""
    if isinstance(result, (bytes, bytearray, memoryview)):
        return STATUS_BYTES, bytes(result)
    try:
        try:
            return STATUS_JSON, _JSON.encode(result).encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate in a string: escape everything instead.
            return STATUS_JSON, _JSON_ASCII.encode(result).encode("ascii")
    except BaseException as exc:  # TypeError, ValueError (NaN, cycles), RecursionError...
        return STATUS_ERROR, error_object(
            type(exc).__name__, f"the handler's result is not JSON: {_message(exc)}", ""
        )


def error_object(type_name, message, traceback_text):
    """The result of a failed call: JSON {"type", "message", "traceback"}."""
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[:MAX_ERROR_MESSAGE] + "..."
    if len(traceback_text) > MAX_TRACEBACK:
        traceback_text = "...\n" + traceback_text[-MAX_TRACEBACK:]
    body = {"type": type_name, "message": message, "traceback": traceback_text}
    return _JSON_ASCII.encode(body).encode("ascii")


def exception_object(exc, tb):
    """error_object for an exception, with the traceback from `tb` on."""
    try:
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:
        text = ""
    return error_object(type(exc).__name__, _message(exc), text)


def _handler_frames(tb):
    """The traceback from the handler's frame on (the first frames are ours)."""
    ours = (Runtime.run.__code__, Function.call.__code__, Restore.run.__code__)
    while tb is not None and tb.tb_frame.f_code in ours:
        tb = tb.tb_next
    return tb


def _message(exc):
    try:
        return str(exc)
    except BaseException:
        return f"<unprintable {type(exc).__name__}>"


class Runtime:
    """Calls a function on one event, with print() captured."""

    def __init__(self, function, restore=None):
        self.function = function
        self.restore = restore if restore is not None else Restore()
        self.stdout = Capture("<stdout>")
        self.stderr = Capture("<stderr>")

    def run(self, event_bytes, context, output_cap, function=None, seed=None, push=None):
        """Runs the handler (or `function`) on the event; never raises.

        With a `seed` (an int of fresh entropy) this is a fresh clone's
        invocation: Restore.run goes first (the handler's on_restore hooks
        only before the handler itself, not before `function`). With
        `push`, output is streamed as it is written (see Capture); the
        Response holds only what was not pushed yet.
        """
        hooks = function is None
        function = function or self.function
        event = decode_event(event_bytes)
        out, err = self.stdout, self.stderr
        out.reset(output_cap, push)
        err.reset(output_cap, push)
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        # The monotonic clock is read through the vDSO: no system call.
        started = time.perf_counter_ns()
        try:
            try:
                if seed is not None:
                    self.restore.run(seed, hooks)
                result = function.call(event, context)
            finally:
                handler_ns = time.perf_counter_ns() - started
                sys.stdout, sys.stderr = saved
        except BaseException as exc:  # SystemExit and KeyboardInterrupt included
            status, body = STATUS_ERROR, exception_object(exc, _handler_frames(exc.__traceback__))
        else:
            status, body = encode_result(result)
        stdout, stderr = out.take(), err.take()
        flags = 0
        if out.truncated:
            flags |= RESPONSE_FLAG_STDOUT_TRUNCATED
        if err.truncated:
            flags |= RESPONSE_FLAG_STDERR_TRUNCATED
        # A thread the handler left running pushes no more.
        out.reset(0)
        err.reset(0)
        return Response(status, body, stdout, stderr, flags, max(handler_ns, 1))


# --- After a restore: fresh randomness, the handler's hooks ---------------------------------

_SEED_BITS = REQUEST_ENTROPY_LEN * 8


class Restore:
    """What runs in a fresh clone before its invocation.

    Clones of one snapshot start with the same memory: every generator
    seeded at import time would give every clone the same numbers. Before
    each invocation (in ember each is a fresh clone) this reseeds the
    generators the runtime can find, from the request's entropy, without
    a system call: Python's global `random`, the Random behind `tempfile`'s
    names, and numpy's global generator (`numpy.random.seed`) when
    numpy.random was imported. Then it calls the handler's hooks
    (`ember.on_restore`), in the order they were registered; one that
    raises fails the invocation.
    """

    def __init__(self):
        self.hooks = []

    def on_restore(self, fn):
        if not callable(fn):
            raise TypeError(f"ember.on_restore needs a callable, not {type(fn).__name__}")
        self.hooks.append(fn)
        return fn

    def run(self, seed, hooks=True):
        random.seed(seed)
        modules = sys.modules
        tempfile = modules.get("tempfile")
        if tempfile is not None and getattr(tempfile, "_name_sequence", None) is not None:
            tempfile._name_sequence = None  # remade, from os.urandom, at its next use
        numpy_random = modules.get("numpy.random")
        if numpy_random is not None:
            reseed = getattr(numpy_random, "seed", None)
            if reseed is not None:
                # The seed's 32-bit words and a last word of 1: not the
                # key `random` was given.
                mixed = seed | (1 << _SEED_BITS)
                reseed([(mixed >> shift) & 0xFFFFFFFF for shift in range(0, _SEED_BITS + 32, 32)])
        if hooks:
            for hook in self.hooks:
                hook()


_EMBER_MODULE_DOC = """ember's runtime API for handlers (made by the runtime, not a file).

on_restore(fn): call fn() in every fresh clone, before the handler runs
    (after the runtime has reseeded `random` and numpy's global generator).
    Use it for state made at import time that clones must not share: a
    generator of your own, a UUID, a connection. Returns fn (a decorator).
"""


def install_ember_module(restore):
    """Makes `import ember` give the handler ember.on_restore."""
    module = type(sys)("ember", _EMBER_MODULE_DOC)
    module.on_restore = restore.on_restore
    module.__all__ = ["on_restore"]
    sys.modules["ember"] = module
    return module


# --- The pipes ----------------------------------------------------------------------------


class Pipes:
    """The request pipe (EVENT in) and the response pipe (READY, RESULT out)."""

    def __init__(self, request_fd=3, response_fd=4):
        self._requests = open(request_fd, "rb", closefd=False)
        self._response_fd = response_fd

    def read_event(self):
        """(event bytes, timeout_ms) from the next EVENT, or None at end of file."""
        line = self._requests.readline(MAX_HEADER_LINE + 1)
        if not line:
            return None
        if not line.endswith(b"\n"):
            raise ProtocolError(f"request header too long or cut: {line[:64]!r}")
        fields = line[:-1].split(b" ")
        if len(fields) != 3 or fields[0] != b"EVENT" or not _decimal(fields[1]) or not _decimal(fields[2]):
            raise ProtocolError(f"bad request header: {line[:64]!r}")
        length, timeout_ms = int(fields[1]), int(fields[2])
        event = self._requests.read(length)
        if len(event) != length:
            raise ProtocolError(f"request pipe closed after {len(event)} of {length} event bytes")
        return event, timeout_ms

    def read_load(self):
        """(args, env) from the LOAD message, or None at end of file."""
        line = self._requests.readline(MAX_HEADER_LINE + 1)
        if not line:
            return None
        if not line.endswith(b"\n"):
            raise ProtocolError(f"request header too long or cut: {line[:64]!r}")
        fields = line[:-1].split(b" ")
        if len(fields) != 2 or fields[0] != b"LOAD" or not _decimal(fields[1]):
            raise ProtocolError(f"expected LOAD, got: {line[:64]!r}")
        length = int(fields[1])
        if length > MAX_LOAD_BYTES:
            raise ProtocolError(f"LOAD of {length} bytes is over {MAX_LOAD_BYTES}")
        body = self._requests.read(length)
        if len(body) != length:
            raise ProtocolError(f"request pipe closed after {len(body)} of {length} LOAD bytes")
        try:
            load = json.loads(body.decode("utf-8"))
            args, env = load["args"], load["env"]
        except (UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
            raise ProtocolError(f"LOAD is not {{\"args\", \"env\"}} JSON: {exc}") from None
        if not _strings(args) or not isinstance(env, list) or not all(_strings(p) and len(p) == 2 for p in env):
            raise ProtocolError("LOAD's args must be strings and its env [name, value] pairs of strings")
        return args, dict(env)

    def write_ready(self, info):
        body = json.dumps(info, separators=(",", ":")).encode("ascii")
        self._write(b"READY %d\n" % len(body), body)

    def write_result(self, response):
        header = b"RESULT %s %d %d %d\n" % (
            STATUS_WORDS[response.status],
            len(response.result),
            len(response.stdout),
            len(response.stderr),
        )
        self._write(header, response.result, response.stdout, response.stderr)

    def _write(self, *parts):
        # One buffer, so a small message is one write(2).
        data = memoryview(b"".join(parts))
        while data:
            data = data[os.write(self._response_fd, data) :]


def _strings(items):
    return isinstance(items, list) and all(isinstance(i, str) for i in items)


def _decimal(field):
    return 0 < len(field) <= 20 and field.isdigit()


def serve_pipes(runtime, pipes):
    """Serves EVENTs from the request pipe until it closes."""
    invocation = 0
    while True:
        request = pipes.read_event()
        if request is None:
            return
        event, timeout_ms = request
        invocation += 1
        context = Context(invocation, timeout_ms, time.time_ns(), False)
        seed = int.from_bytes(os.urandom(REQUEST_ENTROPY_LEN), "little")
        pipes.write_result(runtime.run(event, context, PIPE_OUTPUT_CAP, seed=seed))


# --- The hot path ----------------------------------------------------------------------


class HotPath:
    """Serves requests through the shared request and response buffers.

    `request` and `response` are writable buffers (anonymous mmaps in the
    guest); `doorbell(value)` signals the host: a port write in the guest,
    any callable in tests.
    """

    def __init__(self, runtime, pipes, request, response, doorbell, output_cap=HOT_OUTPUT_CAP):
        if len(request) <= REQUEST_HEADER_LEN or len(response) <= RESPONSE_HEADER_LEN:
            raise ValueError("hot-path buffers must be longer than their headers")
        self.runtime = runtime
        self.pipes = pipes
        self.request = request
        self.response = response
        self.doorbell = doorbell
        self.output_cap = output_cap
        # The last request served; the host never sends seq 0.
        self.last_seq = 0
        # One chunk in the response buffer at a time, whichever thread pushes.
        self._push_lock = _thread.allocate_lock()

    def serve_forever(self):
        while True:
            self.serve_one()

    def serve_one(self):
        """Waits for one request, answers it, rings DONE."""
        self.doorbell(DOORBELL_WAITING)
        header = self.wait_for_request()
        via_pipe = self.answer(header)
        self.doorbell(DOORBELL_DONE)
        if via_pipe is not None:
            # After DONE, not before: a response this large does not fit the
            # pipe's buffer either, so writing it must not depend on the
            # agent reading before the host has seen ViaPipe and asked.
            self.pipes.write_result(via_pipe)

    def wait_for_request(self):
        """Spins until a new request is in the buffer; returns its header.

        Pure Python on pages touched long ago: no system call, no sleep (a
        clone resumes with the request already written, so this returns on
        its first look).
        """
        poll = self.poll_request
        while True:
            header = poll()
            if header is not None:
                return header

    def poll_request(self):
        """The request header if a new, well-formed one is there, else None."""
        request = self.request
        # seq first: the host writes it last.
        if _SEQ.unpack_from(request, RQ_SEQ)[0] == self.last_seq:
            return None
        if _MAGIC_VERSION.unpack_from(request, RQ_MAGIC) != (REQUEST_MAGIC, LAYOUT_VERSION):
            return None
        return REQUEST_HEADER.unpack_from(request, 0)

    def answer(self, header, function=None):
        """Runs the request; writes the response buffer.

        Returns the Response still to be sent on the response pipe (the
        header then says ViaPipe), or None.
        """
        _magic, _version, seq, flags, event_len, timeout_ms, unix_time_ns, entropy = header
        self.last_seq = seq
        if flags & REQUEST_FLAG_PING:
            # The host's warm-up round: no handler call, the answer `null`.
            return self._write_response(seq, Response(STATUS_JSON, b"null"))
        # Fresh in every request: the host's entropy (os.urandom would be a
        # system call). As an int: bytes would be hashed with SHA-512 first.
        seed = int.from_bytes(entropy, "little")
        push, cap = None, self.output_cap
        if flags & REQUEST_FLAG_STREAM:
            push, cap = self.push_output, STREAM_OUTPUT_CAP
        if flags & REQUEST_FLAG_VIA_PIPE:
            request = self.pipes.read_event()
            if request is None:
                raise EOFError("request pipe closed")
            event, pipe_timeout_ms = request
            context = Context(seq, pipe_timeout_ms, unix_time_ns, True)
            response = self.runtime.run(event, context, PIPE_OUTPUT_CAP, function, seed, push)
            with self._push_lock:
                self._write_header(seq, STATUS_VIA_PIPE, 0, 0, 0, response.flags, response.handler_ns)
            return response
        if event_len > len(self.request) - REQUEST_HEADER_LEN:
            message = f"event_len {event_len} exceeds the {len(self.request)}-byte request buffer"
            response = Response(STATUS_ERROR, error_object("EmberRequestError", message, ""))
        else:
            event = self.request[REQUEST_HEADER_LEN : REQUEST_HEADER_LEN + event_len]
            context = Context(seq, timeout_ms, unix_time_ns, True)
            response = self.runtime.run(event, context, cap, function, seed, push)
        # A thread the handler left running may be pushing a chunk it took
        # before the call ended: the response goes in after it, never under
        # it (later pushes find nothing to send).
        with self._push_lock:
            return self._write_response(seq, response)

    def push_output(self):
        """Sends what the handler wrote so far to the host, now.

        Each chunk is written into the response buffer as a response with
        status STATUS_OUTPUT (stdout and stderr sections, no result) for the
        current request, and DOORBELL_OUTPUT rings: the ringing vCPU stops
        until the host has read the chunk, so the buffer is free again when
        the ring returns. The final response overwrites the last chunk.
        """
        with self._push_lock:
            out = self.runtime.stdout.take()
            err = self.runtime.stderr.take()
            room = len(self.response) - RESPONSE_HEADER_LEN
            buf = self.response
            while out or err:
                part_out, out = out[:room], out[room:]
                part_err, err = err[: room - len(part_out)], err[room - len(part_out) :]
                end_out = RESPONSE_HEADER_LEN + len(part_out)
                buf[RESPONSE_HEADER_LEN:end_out] = part_out
                buf[end_out : end_out + len(part_err)] = part_err
                self._write_header(self.last_seq, STATUS_OUTPUT, 0, len(part_out), len(part_err), 0, 0)
                self.doorbell(DOORBELL_OUTPUT)

    def _write_response(self, seq, response):
        result, stdout, stderr = response.result, response.stdout, response.stderr
        end_result = RESPONSE_HEADER_LEN + len(result)
        end_stdout = end_result + len(stdout)
        end_stderr = end_stdout + len(stderr)
        if end_stderr > len(self.response):
            self._write_header(seq, STATUS_VIA_PIPE, 0, 0, 0, response.flags, response.handler_ns)
            return response
        # Sections first, then the header: the header vouches for them.
        buf = self.response
        buf[RESPONSE_HEADER_LEN:end_result] = result
        buf[end_result:end_stdout] = stdout
        buf[end_stdout:end_stderr] = stderr
        self._write_header(
            seq, response.status, len(result), len(stdout), len(stderr), response.flags, response.handler_ns
        )
        return None

    def _write_header(self, seq, status, result_len, stdout_len, stderr_len, flags, handler_ns):
        RESPONSE_HEADER.pack_into(
            self.response,
            0,
            RESPONSE_MAGIC,
            LAYOUT_VERSION,
            seq,
            status,
            result_len,
            stdout_len,
            stderr_len,
            flags,
            handler_ns,
        )

    def warm_up(self):
        """Runs the serving code once over the real buffers, before READY.

        Not the user's handler (its side effects would be in the snapshot),
        but our own, through the same code: the interpreter specialises the
        bytecode, lazy imports happen (traceback imports ast), and memory for
        these objects gets allocated now rather than in every clone.
        """
        event = b'{"zero":0,"text":"warm-up \\u00e9"}'
        self.request[REQUEST_HEADER_LEN : REQUEST_HEADER_LEN + len(event)] = event
        entropy = bytes(range(REQUEST_ENTROPY_LEN))
        # Streaming pushes ring: not now (the host is not serving a request).
        bell, self.doorbell = self.doorbell, _silent_doorbell
        try:
            for flags, function in (
                (0, Function(_warm_up_handler)),
                (REQUEST_FLAG_STREAM, Function(_warm_up_handler)),
                (0, Function(_warm_up_failure)),
                (REQUEST_FLAG_PING, None),
            ):
                header = (REQUEST_MAGIC, LAYOUT_VERSION, 1, flags, len(event), 1000, time.time_ns(), entropy)
                self.answer(header, function)
        finally:
            self.doorbell = bell
        # Leave the buffers as a fresh start expects them: no request, no response.
        zeros = bytes(REQUEST_HEADER_LEN + len(event))
        self.request[: len(zeros)] = zeros
        self.response[:RESPONSE_HEADER_LEN] = bytes(RESPONSE_HEADER_LEN)
        self.last_seq = 0
        decode_event(b"not json")  # the two ways an event is not JSON
        decode_event(b"\xff")

    def describe(self, request_addr, response_addr):
        """The READY body for these buffers."""
        return {
            "hot_path": {
                "request": {"addr": request_addr, "len": len(self.request)},
                "response": {"addr": response_addr, "len": len(self.response)},
            }
        }


def _warm_up_handler(event, context):
    print("warm-up", event["text"], context.invocation_id)
    print("warm-up", file=sys.stderr)
    return {"event": event, "values": [1, 2.5, "x", None, True, random.random()]}


def _silent_doorbell(value):
    pass


def _warm_up_failure(event, context):
    return 1 / event["zero"]


# --- Setting the hot path up in the guest -------------------------------------------------

_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS


def doorbell_code():
    """x86-64 code for `void ring(uint32_t *bell, uint32_t value)`: one store."""
    return b"\x89\x37\xc3"  # mov [rdi], esi; ret


_NOOP_OFFSET = 64  # a bare `ret` with the same signature, to warm ctypes up


def build_doorbell(libc):
    """(ring, noop, pages): callables for the doorbell and for a bare ret.

    The doorbell is the guest-physical page DOORBELL_ADDR, where nothing
    lives: a store to it exits straight to the VMM, no guest kernel
    involved. The agent hands over /dev/mem as DOORBELL_FD to map it. The
    store is made by three bytes of machine code rather than by Python, so
    that it is exactly one 32-bit write (Python's buffer copies may split or
    repeat it). Nothing is called here: the host counts every ring.
    """
    bell = mmap.mmap(
        DOORBELL_FD,
        PAGE_SIZE,
        flags=mmap.MAP_SHARED,
        prot=mmap.PROT_READ | mmap.PROT_WRITE,
        offset=DOORBELL_ADDR,
    )
    # The mapping stays; take_doorbell closes the rest of /dev/mem.
    bell_addr = ctypes.addressof(ctypes.c_char.from_buffer(bell))
    prot = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
    page = mmap.mmap(-1, PAGE_SIZE, flags=_MAP_FLAGS, prot=prot)
    code = doorbell_code()
    page[: len(code)] = code
    page[_NOOP_OFFSET] = 0xC3
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    # Written once; from now on only executed (best effort: RWX still works).
    libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(PAGE_SIZE), mmap.PROT_READ | mmap.PROT_EXEC)
    prototype = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32)
    store, noop = prototype(addr), prototype(addr + _NOOP_OFFSET)
    bell_ptr = ctypes.c_void_p(bell_addr)

    def ring(value):
        store(bell_ptr, value)

    def warm(value):
        noop(bell_ptr, value)

    return ring, warm, (page, bell)


def allocate_buffer(size, libc):
    """(mmap, address): an anonymous buffer, every page touched and locked."""
    buf = mmap.mmap(-1, size, flags=_MAP_FLAGS, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        # The host was told these physical pages: keep khugepaged from
        # replacing them by a huge page (a kernel without THP says EINVAL).
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    except (AttributeError, OSError):
        pass
    # Nor may a fork move them: a child sharing them copy-on-write would
    # make the runtime's next write land in a new physical page the host
    # does not read. A handler's child simply does not have them.
    buf.madvise(mmap.MADV_DONTFORK)
    for offset in range(0, size, PAGE_SIZE):
        buf[offset] = 0  # a write fault now, not in a clone
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    if libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(size)) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mlock of {size} bytes: {os.strerror(errno)} (RLIMIT_MEMLOCK?)")
    return buf, addr


def hot_path_size():
    """Bytes per buffer: EMBER_HOT_PATH_BYTES rounded up to pages, or the default."""
    text = os.environ.get("EMBER_HOT_PATH_BYTES")
    if not text:
        return DEFAULT_BUFFER_BYTES
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"EMBER_HOT_PATH_BYTES={text!r} is not a number") from None
    if not REQUEST_HEADER_LEN < size <= MAX_BUFFER_BYTES:
        raise ValueError(f"EMBER_HOT_PATH_BYTES={size} is not in {REQUEST_HEADER_LEN + 1}..={MAX_BUFFER_BYTES}")
    return -(-size // PAGE_SIZE) * PAGE_SIZE


def _print_doorbell(value):
    """The doorbell under EMBER_HOT_PATH_TEST=1: a line on stderr."""
    os.write(2, b"EMBER_DOORBELL %d\n" % value)


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def _is_dev_mem(fd):
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 1)


def take_doorbell(wanted):
    """build_doorbell()'s parts if `wanted`, else None; raises on failure.

    Whatever happens, fd DOORBELL_FD is closed on return, whatever it is:
    the agent's /dev/mem reaches all of the guest's physical address space,
    and the user's code, imported next, must never find it open (nor
    anything else the runtime was not meant to pass on).
    """
    try:
        if not wanted:
            return None
        if not sys.flags.isolated:
            raise OSError("the runtime was not started in isolated mode (python3 -I): no doorbell")
        if not _is_dev_mem(DOORBELL_FD):
            raise OSError(f"fd {DOORBELL_FD} is not /dev/mem: no doorbell")
        return build_doorbell(_libc())
    finally:
        try:
            os.close(DOORBELL_FD)
        except OSError:
            pass  # not open


def setup_hot_path(runtime, pipes, bell=None):
    """(HotPath, READY body); raises if anything is missing.

    `bell` is take_doorbell()'s result; None rings with _print_doorbell.
    """
    size = hot_path_size()
    libc = _libc()
    if bell is None:
        doorbell, code_page = _print_doorbell, None
    else:
        doorbell, noop, code_page = bell
        noop(0)  # the ctypes call path, warmed without ringing
    request, request_addr = allocate_buffer(size, libc)
    response, response_addr = allocate_buffer(size, libc)
    hot = HotPath(runtime, pipes, request, response, doorbell)
    hot.code_page = code_page  # the doorbell's pages live as long as the hot path
    hot.warm_up()
    return hot, hot.describe(request_addr, response_addr)


# --- Keeping the handler's memory mapped ---------------------------------------------------

# Glibc's mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

# The template's pre-touched heap, MiB, unless EMBER_ARENA_MIB says.
DEFAULT_ARENA_MIB = 16
MAX_ARENA_MIB = 16 << 10
# Glibc's largest mmap threshold (32 MiB on 64-bit): anything smaller
# comes from the heap.
MMAP_THRESHOLD = 32 << 20
# "Never give the heap back" (mallopt takes an int).
TRIM_THRESHOLD = (1 << 31) - 1
TOP_PAD = 64 << 20
# What pre-touching allocates at a time: well under MMAP_THRESHOLD, so it
# comes from the heap and goes back to the heap's top when freed.
_TOUCH_CHUNK = 1 << 20


class Memory:
    """How the runtime keeps a handler's allocations off the guest kernel.

    Every fresh page an invocation touches is a guest page fault, and on
    PVM hosts the guest kernel is emulated (~3 ms a page); on hardware
    KVM a fault is a few microseconds, but still guest-kernel work. So the
    runtime makes the heap hold on to memory and touches a block of it at
    template time: clones inherit those pages mapped, and allocations
    during an invocation reuse them. Three parts:

    - glibc keeps memory: allocations up to 32 MiB come from the heap (not
      mmap), the heap is never trimmed, grows 64 MiB at a time, and every
      thread uses the main heap (a thread's own arena is fresh mmap'd
      memory). The VMM also sets the MALLOC_* variables for the
      interpreter's own start; mallopt here covers any other start.
    - pymalloc's 1 MiB arenas (every object up to 512 bytes) come from
      malloc instead of mmap, so they reuse that heap. This is what
      PYTHONMALLOC=malloc would do, but that variable is ignored under -I
      (the runtime's isolated mode), while pymalloc stays as fast as it is.
    - pretouch() allocates and frees the arena block at template time.
    """

    def __init__(self, libc):
        self.libc = libc

    def keep_memory(self):
        """Tells glibc and pymalloc to keep memory; best effort."""
        mallopt = getattr(self.libc, "mallopt", None)
        if mallopt is None:
            return False
        for param, value in (
            (_M_ARENA_MAX, 1),
            (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (_M_TOP_PAD, TOP_PAD),
        ):
            mallopt(param, value)
        try:
            _arenas_from_malloc(self.libc)
        except (OSError, ValueError, AttributeError) as exc:
            print(f"ember-runtime: pymalloc arenas stay on mmap: {exc}", file=sys.stderr)
        return True

    @staticmethod
    def pretouch(size):
        """Allocates `size` bytes of heap, writes every page, frees them.

        In 1 MiB blocks, all alive at once, so the heap grows by `size`;
        freed, they merge into the heap's top, which is never trimmed.
        Written explicitly: calloc skips fresh heap memory (the kernel's
        pages are zero), so a zero-filled bytearray alone touches nothing.
        """
        blocks = []
        zeros = bytes(_TOUCH_CHUNK // PAGE_SIZE)
        for _ in range(-(-size // _TOUCH_CHUNK)):
            block = bytearray(_TOUCH_CHUNK)
            block[::PAGE_SIZE] = zeros
            blocks.append(block)
        del blocks


def arena_size():
    """Bytes to pre-touch: EMBER_ARENA_MIB MiB, or the default."""
    text = os.environ.get("EMBER_ARENA_MIB")
    if text is None or text == "":
        return DEFAULT_ARENA_MIB << 20
    try:
        mib = int(text)
    except ValueError:
        raise ValueError(f"EMBER_ARENA_MIB={text!r} is not a number") from None
    if not 0 <= mib <= MAX_ARENA_MIB:
        raise ValueError(f"EMBER_ARENA_MIB={mib} is not in 0..={MAX_ARENA_MIB}")
    return mib << 20


class _ArenaAllocator(ctypes.Structure):
    """CPython's PyObjectArenaAllocator."""

    _fields_ = [("ctx", ctypes.c_void_p), ("alloc", ctypes.c_void_p), ("free", ctypes.c_void_p)]


def _heap_ceiling():
    """The lowest mapping above the brk heap ([heap] in /proc/self/maps).

    Everything malloc hands out from the heap lies below it; what
    pymalloc mmap'd before the switch lies above.
    """
    heap_end, starts = None, []
    with open("/proc/self/maps", "rb") as maps:
        for line in maps:
            fields = line.split()
            start, _, end = fields[0].partition(b"-")
            start, end = int(start, 16), int(end, 16)
            starts.append(start)
            if fields[-1] == b"[heap]":
                heap_end = end
    if heap_end is None:
        raise OSError("no [heap] in /proc/self/maps")
    above = [start for start in starts if start >= heap_end]
    if not above:
        raise OSError("nothing mapped above the heap")
    return min(above)


def arena_code(malloc, free, ceiling):
    """x86-64 code for pymalloc's arena alloc(ctx, size) and free(ctx, ptr, size).

    alloc is malloc(size). free is free(ptr) for a pointer below `ceiling`
    (malloc's heap); an arena above it was mmap'd before the switch (or by
    malloc's own mmap fallback, which free must not munmap piecemeal) and
    is left mapped: a few MiB at most, and no invocation outlives its clone.
    Returns (code, offset of free).
    """
    alloc = b"\x48\x89\xf7" + b"\x48\xb8" + struct.pack("<Q", malloc) + b"\xff\xe0"
    # mov rdi, rsi; movabs rax, ceiling; cmp rdi, rax; jae ret;
    # movabs rax, free; jmp rax; ret
    tail_call = b"\x48\xb8" + struct.pack("<Q", free) + b"\xff\xe0"
    release = (
        b"\x48\x89\xf7"
        + b"\x48\xb8"
        + struct.pack("<Q", ceiling)
        + b"\x48\x39\xc7"
        + b"\x73"
        + bytes([len(tail_call)])
        + tail_call
        + b"\xc3"
    )
    offset = 64
    return alloc.ljust(offset, b"\xcc") + release, offset


def _arenas_from_malloc(libc):
    """Points pymalloc's arena allocator at malloc (for good: see _immortal_code)."""
    malloc = ctypes.cast(libc.malloc, ctypes.c_void_p).value
    free = ctypes.cast(libc.free, ctypes.c_void_p).value
    code, offset = arena_code(malloc, free, _heap_ceiling())
    addr = _immortal_code(libc, code)
    allocator = _ArenaAllocator(None, addr, addr + offset)
    set_allocator = ctypes.pythonapi.PyObject_SetArenaAllocator
    set_allocator.argtypes = [ctypes.POINTER(_ArenaAllocator)]
    set_allocator.restype = None
    set_allocator(ctypes.byref(allocator))  # copies the struct


def _immortal_code(libc, code):
    """The address of a page holding `code`, read+exec, never unmapped.

    Mapped with libc's mmap, not Python's: pymalloc calls into it until
    the process ends, after Python objects (an mmap's unmapping included)
    have been torn down at exit.
    """
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mmap.restype = ctypes.c_void_p
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    addr = libc.mmap(None, PAGE_SIZE, prot, _MAP_FLAGS, -1, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mmap of a code page: {os.strerror(errno)}")
    ctypes.memmove(addr, code, len(code))
    if libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(PAGE_SIZE), mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mprotect of a code page: {os.strerror(errno)}")
    return addr


# --- Start-up -----------------------------------------------------------------------------


def _print_startup_error(exc, path, bundle=False):
    """An import failure on stderr, from the handler's first frame on."""
    tb = exc.__traceback__
    if bundle:
        skipped = (os.path.abspath(__file__), importlib.__file__)
        while tb is not None and (
            tb.tb_frame.f_code.co_filename in skipped
            or tb.tb_frame.f_code.co_filename.startswith("<frozen importlib")
        ):
            tb = tb.tb_next  # skip this runtime's and importlib's frames
    else:
        while tb is not None and tb.tb_frame.f_code.co_filename != path:
            tb = tb.tb_next  # skip this runtime's and importlib's frames
    print(f"ember-runtime: cannot load the handler from {path}:", file=sys.stderr)
    traceback.print_exception(type(exc), exc, tb, file=sys.stderr)


USAGE = (
    "usage: ember_runtime.py <handler_file.py> <handler_name>\n"
    "       ember_runtime.py --bundle <code_dir> <module> <handler_name>\n"
    "       ember_runtime.py --wait-for-code"
)


def parse_handler_args(args):
    """(bundle, code_dir, path or module, handler name) from the arguments
    that name the handler, or None if they do not."""
    if len(args) == 4 and args[0] == "--bundle":
        return True, os.path.abspath(args[1]), args[2], args[3]
    if len(args) == 2 and not args[0].startswith("--"):
        return False, None, os.path.abspath(args[0]), args[1]
    return None


def load_handler(parsed):
    """The handler's Function, or None after printing why on stderr."""
    bundle, code_dir, path, handler_name = parsed
    try:
        if bundle:
            importing = time.monotonic()
            function = load_module(code_dir, path, handler_name)
            # Reported with the start (the host logs it): importing from
            # the code drive is what a bundle adds to a template's making.
            print(
                f"ember-runtime: imported {path} in {(time.monotonic() - importing) * 1000:.0f} ms",
                file=sys.stderr,
            )
        else:
            sys.path.insert(0, os.path.dirname(path))
            function = load_function(path, handler_name)
    except StartupError as exc:
        print(f"ember-runtime: {exc}", file=sys.stderr)
        return None
    except BaseException as exc:  # whatever importing the user's code raised
        _print_startup_error(exc, path, bundle)
        return None
    return function


def _start_hot_path(runtime, pipes, bell, bell_error):
    """(HotPath or None, READY body)."""
    try:
        if bell_error is not None:
            raise bell_error
        return setup_hot_path(runtime, pipes, bell)
    except Exception as exc:
        print(f"ember-runtime: no hot path, serving on the pipes only: {exc}", file=sys.stderr)
        return None, {}


def _pretouch(arena, hot):
    """Touches the heap every invocation allocates from (and the hot
    path's room for large events and results)."""
    touching = time.monotonic()
    heap = arena + (4 * len(hot.request) if hot is not None else 0)
    Memory.pretouch(heap)
    if arena:
        print(
            f"ember-runtime: {heap >> 20} MiB of heap touched in {(time.monotonic() - touching) * 1000:.0f} ms",
            file=sys.stderr,
        )


def _settle():
    """What clones inherit: no buffered output (each clone would flush its
    own copy) and a heap the collector no longer walks (its walks would
    write to every old object's page in every clone)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    gc.collect()
    gc.freeze()


def main(argv):
    # --wait-for-code: a base snapshot's runtime. Everything but the
    # handler is set up (the doorbell taken and /dev/mem closed, the hot
    # path built and warmed), READY is written, and the handler arrives
    # later in a LOAD message on the request pipe (in each clone of the
    # base that becomes a function template).
    waiting = argv[1:] == ["--wait-for-code"]
    parsed = None if waiting else parse_handler_args(argv[1:])
    if not waiting and parsed is None:
        print(USAGE, file=sys.stderr)
        return 2
    want_hot_path = os.environ.get("EMBER_HOT_PATH") == "1"
    test_doorbell = os.environ.get("EMBER_HOT_PATH_TEST") == "1"
    # Before the user's module is imported: see take_doorbell.
    bell, bell_error = None, None
    try:
        bell = take_doorbell(want_hot_path and not test_doorbell)
    except Exception as exc:
        bell_error = exc
    # Before the handler's import, so its allocations keep their memory too.
    try:
        arena = arena_size()
    except ValueError as exc:
        print(f"ember-runtime: {exc}", file=sys.stderr)
        return 1
    # EMBER_KEEP_MEMORY=0 leaves glibc and pymalloc as they come (to
    # measure what keeping memory saves).
    if os.environ.get("EMBER_KEEP_MEMORY") != "0":
        Memory(_libc()).keep_memory()
    # Only now: the function's directory becomes importable (a sibling
    # helper.py is `import helper`), as does the `ember` module.
    restore = Restore()
    install_ember_module(restore)
    pipes = Pipes(3, 4)
    hot, ready = None, {}
    if waiting:
        runtime = Runtime(None, restore)
        if want_hot_path:
            hot, ready = _start_hot_path(runtime, pipes, bell, bell_error)
        # Touched in the base already, so that clones find these pages
        # mapped; touched again after the import, with the function's size.
        _pretouch(arena, hot)
        _settle()
        try:
            pipes.write_ready(ready)
            load = pipes.read_load()
        except BrokenPipeError:
            print("ember-runtime: the response pipe is closed", file=sys.stderr)
            return 1
        except ProtocolError as exc:
            print(f"ember-runtime: {exc}", file=sys.stderr)
            return 1
        if load is None:
            return 0  # the agent closed the request pipe
        args, env = load
        parsed = parse_handler_args(args)
        if parsed is None:
            print(f"ember-runtime: LOAD names no handler: {args!r}\n{USAGE}", file=sys.stderr)
            return 2
        os.environ.update(env)
        try:
            arena = arena_size()  # the function's own setting
        except ValueError as exc:
            print(f"ember-runtime: {exc}", file=sys.stderr)
            return 1
        if parsed[0]:
            os.chdir(parsed[1])  # a bundle's runtime works in its code directory
        runtime.function = load_handler(parsed)
        if runtime.function is None:
            return 1
    else:
        function = load_handler(parsed)
        if function is None:
            return 1
        runtime = Runtime(function, restore)
        if want_hot_path:
            hot, ready = _start_hot_path(runtime, pipes, bell, bell_error)
    _pretouch(arena, hot)
    _settle()

    try:
        pipes.write_ready(ready)
        if hot is not None:
            hot.serve_forever()
        else:
            serve_pipes(runtime, pipes)
    except EOFError:
        pass  # the agent closed the request pipe
    except BrokenPipeError:
        print("ember-runtime: the response pipe is closed", file=sys.stderr)
        return 1
    except ProtocolError as exc:
        print(f"ember-runtime: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Tests for ember_runtime.py and the example functions, run on the host:

    python3 guest-agent/runtimes/python3/test_runtime.py

The pipe path runs the runtime as the agent would (fd 3 and fd 4 pipes).
The hot path's buffer logic runs in-process with a fake doorbell, and once
end to end in a child process with EMBER_HOT_PATH_TEST=1 (the doorbell
prints a line), the test writing the request into the child's memory
through /proc/<pid>/mem as the host writes guest memory. The real doorbell
(a store to the guest's doorbell page) is never executed here.
"""

import ctypes
import fcntl
import importlib.util
import json
import os
import queue
import random
import re
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
import unittest
import unittest.mock

HERE = os.path.dirname(os.path.abspath(__file__))
RUNTIME = os.path.join(HERE, "ember_runtime.py")
REPO = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
EXAMPLES = os.path.join(REPO, "examples", "functions")
HOTPATH_RS = os.path.join(REPO, "protocol", "src", "hotpath.rs")
# The interpreter flags the host asks the agent for.
PYTHON = [sys.executable, "-I", "-u", "-B"]
TIMEOUT_S = 20


def _load_runtime_module():
    spec = importlib.util.spec_from_file_location("ember_runtime", RUNTIME)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rt = _load_runtime_module()
_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


# --- Driving a runtime process over its pipes -------------------------------------------


class Reader:
    """Exact reads from a pipe with a deadline (a broken runtime must not hang the tests)."""

    def __init__(self, fd):
        self.fd = fd
        self.pending = b""

    def _fill(self, deadline):
        wait = deadline - time.monotonic()
        if wait <= 0 or not select.select([self.fd], [], [], wait)[0]:
            raise TimeoutError("the runtime did not answer in time")
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            raise EOFError("the runtime closed its response pipe")
        self.pending += chunk

    def line(self, timeout=TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            self._fill(deadline)
        line, self.pending = self.pending.split(b"\n", 1)
        return line

    def exactly(self, n, timeout=TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while len(self.pending) < n:
            self._fill(deadline)
        data, self.pending = self.pending[:n], self.pending[n:]
        return data

    def at_eof(self, timeout=TIMEOUT_S):
        try:
            self._fill(time.monotonic() + timeout)
        except EOFError:
            return True
        return False


class Process:
    """A runtime (or exec-runtime) child with fd 3 = request pipe, fd 4 = response pipe."""

    def __init__(self, argv, env=None, cwd=None, extra_fds=None):
        request_r, self.request_w = os.pipe()
        response_r, response_w = os.pipe()
        # Out of the way of 3, 4 and 5 first, so that the dup2s below cannot
        # overwrite each other; inheritable only through the dup2.
        child_r = fcntl.fcntl(request_r, fcntl.F_DUPFD_CLOEXEC, 10)
        child_w = fcntl.fcntl(response_w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(request_r)
        os.close(response_w)
        # {child fd: parent fd} beyond the pipes.
        extra = {n: fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for n, fd in (extra_fds or {}).items()}

        def become_runtime_fds():
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)
            for n, fd in extra.items():
                os.dup2(fd, n)
            # A hot-path runtime spins: never leave one behind the tests.
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=become_runtime_fds,
            close_fds=False,  # 3 and 4 are made after subprocess picks fds to keep
        )
        os.close(child_r)
        os.close(child_w)
        for fd in extra.values():
            os.close(fd)
        self.responses = Reader(response_r)
        self._response_r = response_r
        self._sender = None

    def ready(self):
        line = self.responses.line()
        word, n = line.split(b" ")
        assert word == b"READY", line
        return json.loads(self.responses.exactly(int(n)))

    def send(self, event, timeout_ms=1000):
        data = memoryview(b"EVENT %d %d\n" % (len(event), timeout_ms) + event)

        def write_all(fd=self.request_w):
            nonlocal data
            while data:
                data = data[os.write(fd, data) :]

        # A streaming runtime (echo.sh) answers while it reads: write in the
        # background so that a large event cannot fill both pipes.
        self._sender = threading.Thread(target=write_all)
        self._sender.start()

    def result(self):
        line = self.responses.line()
        assert len(line) <= 128, line
        word, status, *lengths = line.decode("ascii").split(" ")
        assert word == "RESULT", line
        result_len, stdout_len, stderr_len = map(int, lengths)
        sections = (
            self.responses.exactly(result_len),
            self.responses.exactly(stdout_len),
            self.responses.exactly(stderr_len),
        )
        if self._sender is not None:
            self._sender.join(TIMEOUT_S)
            assert not self._sender.is_alive(), "the event was not all read"
            self._sender = None
        return (status, *sections)

    def call(self, event, timeout_ms=1000):
        self.send(event, timeout_ms)
        return self.result()

    def close(self):
        """Closes the request pipe; returns (exit status, stderr)."""
        if self.request_w is not None:
            os.close(self.request_w)
            self.request_w = None
        try:
            _, stderr = self.proc.communicate(timeout=TIMEOUT_S)
        finally:
            self.kill()
        return self.proc.returncode, stderr.decode("utf-8", "replace")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream and not stream.closed:
                stream.close()
        if self.request_w is not None:
            os.close(self.request_w)
            self.request_w = None
        if self._response_r is not None:
            os.close(self._response_r)
            self._response_r = None


class FunctionDir:
    """A temporary function directory for handler files; the runtime runs
    from a directory of its own, as in the guest (/run/ember/runtime)."""

    def __init__(self, test):
        self.path = tempfile.mkdtemp(prefix="ember-fn-")
        test.addCleanup(shutil.rmtree, self.path, True)
        self.runtime_dir = tempfile.mkdtemp(prefix="ember-runtime-")
        test.addCleanup(shutil.rmtree, self.runtime_dir, True)
        self.runtime = os.path.join(self.runtime_dir, "ember_runtime.py")
        shutil.copy(RUNTIME, self.runtime)

    def add(self, name, source):
        path = os.path.join(self.path, name)
        with open(path, "w") as f:
            f.write(textwrap.dedent(source))
        return path

    def add_example(self, name):
        shutil.copy(os.path.join(EXAMPLES, name), self.path)

    def start(self, test, handler_file, handler="handler", env=None, flags=None, extra_fds=None):
        # No pre-touched heap unless a test asks: quicker, and start-up stays silent.
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "EMBER_ARENA_MIB": "0"}
        full_env.update(env or {})
        argv = (flags if flags is not None else PYTHON) + [self.runtime, handler_file, handler]
        process = Process(argv, env=full_env, cwd=self.path, extra_fds=extra_fds)
        test.addCleanup(process.kill)
        return process


# --- The pipe path ------------------------------------------------------------------------


class PipePathTests(unittest.TestCase):
    def setUp(self):
        self.fn = FunctionDir(self)

    def start(self, source, handler="handler", **kwargs):
        self.fn.add("main.py", source)
        process = self.fn.start(self, "main.py", handler, **kwargs)
        self.assertEqual(process.ready(), {})
        return process

    def test_echo_example(self):
        self.fn.add_example("echo.py")
        p = self.fn.start(self, "echo.py")
        self.assertEqual(p.ready(), {})
        status, result, out, err = p.call(b'{"a": [1, 2, "\xc3\xa9"]}')
        self.assertEqual(status, "json")
        self.assertEqual(result, '{"echo":{"a":[1,2,"é"]}}'.encode())
        self.assertEqual((out, err), (b"", b""))
        self.assertEqual(p.close(), (0, ""))

    def test_counter_example_counts_per_process(self):
        self.fn.add_example("counter.py")
        p = self.fn.start(self, "counter.py")
        p.ready()
        self.assertEqual([p.call(b"{}")[1] for _ in range(3)], [b"1", b"2", b"3"])

    def test_exception_is_an_error_object_with_traceback(self):
        self.fn.add_example("fail.py")
        p = self.fn.start(self, "fail.py")
        p.ready()
        status, result, _, _ = p.call(b'{"x": 1}')
        self.assertEqual(status, "error")
        error = json.loads(result)
        self.assertEqual(set(error), {"type", "message", "traceback"})
        self.assertEqual(error["type"], "ValueError")
        self.assertEqual(error["message"], "this function always fails (event: {'x': 1})")
        self.assertTrue(error["traceback"].startswith("Traceback (most recent call last):\n"))
        self.assertIn("fail.py", error["traceback"])
        self.assertIn('raise ValueError(f"this function always fails', error["traceback"])
        self.assertTrue(error["traceback"].endswith("ValueError: this function always fails (event: {'x': 1})\n"))
        # The runtime's own frames are not the user's business.
        self.assertNotIn("ember_runtime.py", error["traceback"])
        # And it keeps serving.
        self.assertEqual(p.call(b"2")[0], "error")

    def test_bytes_result(self):
        p = self.start(
            """
            def handler(event, context):
                if event == 1:
                    return b"\\x00raw\\xff"
                if event == 2:
                    return bytearray(b"ba")
                return memoryview(b"mv")
            """
        )
        self.assertEqual(p.call(b"1")[:2], ("bytes", b"\x00raw\xff"))
        self.assertEqual(p.call(b"2")[:2], ("bytes", b"ba"))
        self.assertEqual(p.call(b"3")[:2], ("bytes", b"mv"))

    def test_print_is_captured(self):
        p = self.start(
            """
            import sys
            print("at import: goes to the process's stdout, not a result")

            def handler(event, context):
                print("hello", event)
                print("oops", file=sys.stderr)
                sys.stdout.write("é\\n")
                sys.stdout.buffer.write(b"raw\\n")
                sys.stdout.flush()
                return None
            """
        )
        status, result, out, err = p.call(b'"x"')
        self.assertEqual((status, result), ("json", b"null"))
        self.assertEqual(out, "hello x\né\nraw\n".encode())
        self.assertEqual(err, b"oops\n")
        # Each call starts with empty captures.
        self.assertEqual(p.call(b'"y"')[2], "hello y\né\nraw\n".encode())

    def test_import_time_output_goes_to_the_real_stdout(self):
        self.fn.add("main.py", 'print("at import")\ndef handler(e, c):\n    print("in call")\n')
        p = self.fn.start(self, "main.py")
        p.ready()
        self.assertEqual(p.call(b"1")[2], b"in call\n")
        os.close(p.request_w)
        p.request_w = None
        stdout, _ = p.proc.communicate(timeout=TIMEOUT_S)
        self.assertEqual(stdout, b"at import\n")

    def test_non_json_event_is_passed_as_bytes(self):
        p = self.start(
            """
            def handler(event, context):
                return {"type": type(event).__name__, "value": event.hex() if isinstance(event, bytes) else event}
            """
        )
        self.assertEqual(json.loads(p.call(b"\xff\xfe\x00")[1]), {"type": "bytes", "value": "fffe00"})
        self.assertEqual(json.loads(p.call(b"not json")[1]), {"type": "bytes", "value": b"not json".hex()})
        self.assertEqual(json.loads(p.call(b"[" * 100000)[1])["type"], "bytes")  # too deep for json
        self.assertEqual(json.loads(p.call(b'{"ok": true}')[1]), {"type": "dict", "value": {"ok": True}})
        self.assertEqual(json.loads(p.call(b"")[1]), {"type": "NoneType", "value": None})

    def test_one_argument_handler(self):
        p = self.start(
            """
            def handler(event):
                return [event, "one"]
            """
        )
        self.assertEqual(p.call(b"7")[:2], ("json", b'[7,"one"]'))

    def test_other_callables(self):
        p = self.start(
            """
            import functools

            class Handler:
                def __call__(self, event, context=None):
                    return context is not None

            handler = Handler()
            with_kwargs = lambda event, *rest: len(rest)
            partial = functools.partial(lambda prefix, event: prefix + event, "p-")

            async def coroutine(event, context):
                return "async " + event
            """
        )
        self.assertEqual(p.call(b"1")[1], b"true")
        p.close()
        for name, event, expected in (
            ("with_kwargs", b"1", b"1"),
            ("partial", b'"e"', b'"p-e"'),
            ("coroutine", b'"x"', b'"async x"'),
        ):
            process = self.fn.start(self, "main.py", name)
            process.ready()
            self.assertEqual(process.call(event)[:2], ("json", expected), name)
            process.close()

    def test_system_exit_and_keyboard_interrupt_are_errors(self):
        p = self.start(
            """
            import sys

            def handler(event, context):
                if event == "exit":
                    sys.exit(3)
                if event == "interrupt":
                    raise KeyboardInterrupt
                if event == "deep":
                    return handler(event, context)
                return "still here"
            """
        )
        for event, kind in (
            (b'"exit"', "SystemExit"),
            (b'"interrupt"', "KeyboardInterrupt"),
            (b'"deep"', "RecursionError"),
        ):
            status, result, _, _ = p.call(event)
            self.assertEqual(status, "error")
            self.assertEqual(json.loads(result)["type"], kind)
        self.assertEqual(json.loads(p.call(b'"exit"')[1])["message"], "3")
        self.assertEqual(p.call(b'"ok"')[:2], ("json", b'"still here"'))

    def test_results_that_are_not_json(self):
        p = self.start(
            """
            def handler(event, context):
                return {"set": {1}, "nan": float("nan"), "surrogate": "\\ud800", "cycle": None}[event]
            """
        )
        status, result, _, _ = p.call(b'"set"')
        self.assertEqual(status, "error")
        error = json.loads(result)
        self.assertEqual(error["type"], "TypeError")
        self.assertIn("not JSON serializable", error["message"])
        status, result, _, _ = p.call(b'"nan"')
        self.assertEqual((status, json.loads(result)["type"]), ("error", "ValueError"))
        # A lone surrogate cannot be UTF-8; it is escaped instead.
        self.assertEqual(p.call(b'"surrogate"')[:2], ("json", b'"\\ud800"'))

    def test_context_on_the_pipe(self):
        self.fn.add_example("info.py")
        p = self.fn.start(self, "info.py")
        p.ready()
        before = time.time_ns()
        status, result, out, err = p.call(b'{"k": 1}', timeout_ms=1234)
        info = json.loads(result)
        self.assertEqual(status, "json")
        self.assertEqual(info["event"], {"k": 1})
        self.assertEqual(info["invocation_id"], 1)
        self.assertEqual(info["timeout_ms"], 1234)
        self.assertFalse(info["hot_path"])
        self.assertLessEqual(before, info["unix_time_ns"])
        self.assertLessEqual(info["unix_time_ns"], time.time_ns())
        self.assertEqual(out, b"info: called with dict\n")
        self.assertEqual(err, b"info: a line on stderr\n")
        self.assertEqual(json.loads(p.call(b"{}")[1])["invocation_id"], 2)

    def test_rand_example_differs_per_call(self):
        self.fn.add_example("rand.py")
        p = self.fn.start(self, "rand.py")
        p.ready()
        values = {json.loads(p.call(b"{}")[1]) for _ in range(3)}
        self.assertEqual(len(values), 3)
        self.assertTrue(all(len(v) == 32 and int(v, 16) >= 0 for v in values))

    def test_large_event_and_result(self):
        p = self.start("def handler(event, context):\n    return event\n")
        event = json.dumps(["x" * 1000] * 2000).encode()
        status, result, _, _ = p.call(event)
        self.assertEqual((status, json.loads(result)), ("json", json.loads(event)))

    def test_siblings_import_and_no_pycache(self):
        self.fn.add("helper.py", "VALUE = 42\n")
        # Without -B: the runtime itself keeps bytecode out of the function dir.
        p = self.start("import helper\ndef handler(e, c):\n    return helper.VALUE\n", flags=[sys.executable])
        self.assertEqual(p.call(b"{}")[1], b"42")
        self.assertFalse(os.path.exists(os.path.join(self.fn.path, "__pycache__")))

    def test_end_of_requests_exits_cleanly(self):
        p = self.start("def handler(e, c):\n    return 1\n")
        os.close(p.request_w)
        p.request_w = None
        self.assertTrue(p.responses.at_eof())
        self.assertEqual(p.close(), (0, ""))

    def test_bad_request_header_exits(self):
        p = self.start("def handler(e, c):\n    return 1\n")
        os.write(p.request_w, b"EVENT x 1\n")
        code, stderr = p.close()
        self.assertEqual(code, 1)
        self.assertIn("bad request header", stderr)

    def test_hot_path_fallback(self):
        self.fn.add("main.py", "def handler(e, c):\n    return c.hot_path\n")
        p = self.fn.start(self, "main.py", env={"EMBER_HOT_PATH": "1", "EMBER_HOT_PATH_BYTES": "lots"})
        self.assertEqual(p.ready(), {})
        self.assertEqual(p.call(b"{}")[:2], ("json", b"false"))
        _, stderr = p.close()
        self.assertIn("no hot path, serving on the pipes only", stderr)
        self.assertIn("fd 5 is not /dev/mem", stderr)
        # With the test doorbell (no /dev/mem needed) the next check fails.
        p = self.fn.start(
            self,
            "main.py",
            env={"EMBER_HOT_PATH": "1", "EMBER_HOT_PATH_TEST": "1", "EMBER_HOT_PATH_BYTES": "lots"},
        )
        self.assertEqual(p.ready(), {})
        self.assertEqual(p.call(b"{}")[:2], ("json", b"false"))
        _, stderr = p.close()
        self.assertIn("no hot path, serving on the pipes only: EMBER_HOT_PATH_BYTES='lots'", stderr)

    def test_dev_mem_is_closed_before_the_handler_is_imported(self):
        # Many hosts (this project's CI among them) have no /dev/mem, so
        # /dev/null stands in for it: the runtime is started through a
        # launcher that makes _is_dev_mem recognise /dev/null's device
        # number instead (test_dev_mem_is_recognised checks the real one).
        stand_in = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self.addCleanup(os.close, stand_in)
        launcher = PYTHON + [
            "-c",
            textwrap.dedent(
                """
                import os, stat, sys
                sys.argv = sys.argv[1:]
                sys.path.insert(0, os.path.dirname(sys.argv[0]))
                import ember_runtime as rt
                null = os.stat("/dev/null").st_rdev
                def is_stand_in(fd):
                    try:
                        st = os.fstat(fd)
                    except OSError:
                        return False
                    return stat.S_ISCHR(st.st_mode) and st.st_rdev == null
                rt._is_dev_mem = is_stand_in
                sys.exit(rt.main(sys.argv))
                """
            ),
        ]
        self.fn.add(
            "main.py",
            """
            import os
            try:
                os.fstat(5)
                AT_IMPORT = "fd 5 open"
            except OSError:
                AT_IMPORT = "fd 5 closed"

            def handler(event, context):
                return AT_IMPORT
            """,
        )
        # Not asking for the hot path (as when the agent could not grant
        # it all): /dev/mem is still closed, not left to the user's code.
        p = self.fn.start(self, "main.py", flags=launcher, extra_fds={5: stand_in})
        self.assertEqual(p.ready(), {})
        self.assertEqual(p.call(b"{}")[1], b'"fd 5 closed"')


# --- Hostile handlers: fd 5 (/dev/mem) never reaches the function's code ------------------

# A module named like one the runtime imports (json, ctypes, random) or like
# the runtime itself. Wherever it runs it says, on the real stderr, whether
# fd 5 was open; imported in place of the standard library's module (what
# the runtime must prevent) it then becomes that module, so that the runtime
# keeps working and nothing else gives it away.
SHADOW = """
import os
import sys

try:
    os.fstat(5)
    FD5 = "open"
except OSError as exc:
    FD5 = os.strerror(exc.errno)
os.write(2, f"shadow {__name__}: fd 5 {FD5}\\n".encode())
if __name__ in ("json", "ctypes", "random"):
    here = os.path.dirname(os.path.abspath(__file__))
    del sys.modules[__name__]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    import importlib

    sys.modules[__name__] = importlib.import_module(__name__)
    sys.path[:] = saved


def handler(event, context):
    return FD5
"""

EBADF_TEXT = os.strerror(9)  # "Bad file descriptor"


class HostileHandlerTests(unittest.TestCase):
    """Each start gets a pipe on fd 5 standing in for /dev/mem (no host here
    may map the real one) and EMBER_HOT_PATH=1, as the agent starts it."""

    def setUp(self):
        self.fn = FunctionDir(self)
        fd5_r, fd5_w = os.pipe()
        self.addCleanup(os.close, fd5_r)
        self.addCleanup(os.close, fd5_w)
        self.fd5 = fd5_r

    def start(self, handler_file, env=None, flags=None):
        full_env = {"EMBER_HOT_PATH": "1"}
        full_env.update(env or {})
        return self.fn.start(self, handler_file, env=full_env, flags=flags, extra_fds={5: self.fd5})

    def assert_fd5_never_seen(self, p, result):
        status, body, _, _ = result
        self.assertEqual((status, json.loads(body)), ("json", EBADF_TEXT))
        _, stderr = p.close()
        self.assertNotIn("fd 5 open", stderr)
        return stderr

    def test_handler_named_like_a_module_of_the_runtime(self):
        for name in ("json.py", "ctypes.py", "random.py", "ember_runtime.py"):
            with self.subTest(name=name):
                self.fn.add(name, SHADOW)
                p = self.start(name)
                self.assertEqual(p.ready(), {})
                self.assert_fd5_never_seen(p, p.call(b"{}"))
                os.unlink(os.path.join(self.fn.path, name))

    def test_siblings_shadowing_modules_of_the_runtime(self):
        for name in ("json.py", "ctypes.py", "random.py", "ember_runtime.py"):
            self.fn.add(name, SHADOW)
        self.fn.add("main.py", "import json, ctypes, random\n" + SHADOW)
        p = self.start("main.py")
        self.assertEqual(p.ready(), {})
        stderr = self.assert_fd5_never_seen(p, p.call(b"{}"))
        # The runtime's modules are the standard library's, loaded before
        # the function's directory was on sys.path: the handler's own
        # imports find them loaded, and the siblings never run.
        for name in ("json", "ctypes", "random", "ember_runtime"):
            self.assertNotIn(f"shadow {name}:", stderr)

    def test_python_environment_variables_are_ignored(self):
        elsewhere = tempfile.mkdtemp(prefix="ember-pythonpath-")
        self.addCleanup(shutil.rmtree, elsewhere, True)
        marker = os.path.join(elsewhere, "ran")
        for name in ("sitecustomize.py", "usercustomize.py", "startup.py"):
            with open(os.path.join(elsewhere, name), "w") as f:
                f.write(f"open({marker!r}, 'a').write({name!r})\n")
        with open(os.path.join(elsewhere, "json.py"), "w") as f:
            f.write(SHADOW)
        self.fn.add("main.py", SHADOW)
        env = {"PYTHONPATH": elsewhere, "PYTHONSTARTUP": os.path.join(elsewhere, "startup.py"), "PYTHONINSPECT": "1"}
        p = self.start("main.py", env=env)
        self.assertEqual(p.ready(), {})
        self.assert_fd5_never_seen(p, p.call(b"{}"))
        self.assertFalse(os.path.exists(marker), "code from PYTHON* variables ran")

    def test_without_isolated_mode_fd5_goes_before_any_import(self):
        # Started without -I and with the function directory on PYTHONPATH,
        # the runtime's own imports are shadowed: fd 5 must be shut already.
        self.fn.add("json.py", SHADOW)
        self.fn.add("main.py", SHADOW)
        p = self.start("main.py", env={"PYTHONPATH": self.fn.path}, flags=[sys.executable, "-u", "-B"])
        self.assertEqual(p.ready(), {})
        stderr = self.assert_fd5_never_seen(p, p.call(b"{}"))
        self.assertIn(f"shadow json: fd 5 {EBADF_TEXT}", stderr)
        self.assertIn("not started in isolated mode", stderr)


# --- After a restore: reseeding and ember.on_restore -----------------------------------------

# A stand-in for numpy (not installed here, nor in the guest image): its
# numpy.random keeps numpy's global-generator API (seed, random) and records
# the seeds. It tests that the runtime reseeds numpy's global generator
# through numpy.random.seed, not numpy itself.
FAKE_NUMPY_INIT = "from . import random\n"
FAKE_NUMPY_RANDOM = """
import random as _random

seeds = []
_state = _random.Random(0)


def seed(value=None):
    seeds.append(list(value) if isinstance(value, (list, tuple)) else value)
    _state.seed(repr(value))


def random():
    return _state.random()
"""


class RestoreTests(unittest.TestCase):
    def setUp(self):
        self.fn = FunctionDir(self)

    def start(self, source):
        self.fn.add("main.py", source)
        p = self.fn.start(self, "main.py")
        self.assertEqual(p.ready(), {})
        return p

    def test_on_restore_hooks_run_before_every_call(self):
        p = self.start(
            """
            import random
            import ember

            state = {"hooks": [], "token": "from the snapshot"}

            @ember.on_restore
            def first():
                state["hooks"].append("first")
                # random is already reseeded: a fresh token, no system call.
                state["token"] = random.getrandbits(64)

            ember.on_restore(lambda: state["hooks"].append("second"))

            def handler(event, context):
                hooks, state["hooks"] = state["hooks"], []
                return {"hooks": hooks, "token": state["token"]}
            """
        )
        first = json.loads(p.call(b"{}")[1])
        second = json.loads(p.call(b"{}")[1])
        self.assertEqual(first["hooks"], ["first", "second"])
        self.assertEqual(second["hooks"], ["first", "second"])
        self.assertIsInstance(first["token"], int)
        self.assertNotEqual(first["token"], second["token"])

    def test_a_failing_hook_fails_the_invocation(self):
        p = self.start(
            """
            import ember

            calls = []

            @ember.on_restore
            def reconnect():
                if not calls:
                    raise ConnectionError("no database")

            def handler(event, context):
                calls.append(event)
                return len(calls)
            """
        )
        status, result, _, _ = p.call(b"{}")
        self.assertEqual(status, "error")
        error = json.loads(result)
        self.assertEqual((error["type"], error["message"]), ("ConnectionError", "no database"))
        self.assertIn("in reconnect", error["traceback"])
        self.assertNotIn("ember_runtime.py", error["traceback"])
        # The handler did not run, the runtime serves on.
        status, result, _, _ = p.call(b"{}")
        self.assertEqual(status, "error")

    def test_on_restore_needs_a_callable(self):
        self.fn.add("main.py", "import ember\nember.on_restore(3)\ndef handler(e):\n    return 1\n")
        p = self.fn.start(self, "main.py")
        self.assertTrue(p.responses.at_eof(), "no READY expected")
        code, stderr = p.close()
        self.assertEqual(code, 1)
        self.assertIn("TypeError: ember.on_restore needs a callable, not int", stderr)

    def test_numpy_global_generator_is_reseeded(self):
        os.mkdir(os.path.join(self.fn.path, "numpy"))
        self.fn.add("numpy/__init__.py", FAKE_NUMPY_INIT)
        self.fn.add("numpy/random.py", FAKE_NUMPY_RANDOM)
        p = self.start(
            """
            import numpy as np

            np.random.seed(0)  # at import: in the snapshot, shared by every clone

            def handler(event, context):
                return {"value": np.random.random(), "seeds": np.random.seeds}
            """
        )
        first = json.loads(p.call(b"{}")[1])
        second = json.loads(p.call(b"{}")[1])
        self.assertNotEqual(first["value"], second["value"])
        self.assertEqual(first["seeds"][0], 0)
        key = first["seeds"][-1]
        self.assertEqual(len(key), 7)  # 192 bits of entropy and a marker word
        self.assertTrue(all(0 <= word < 1 << 32 for word in key))
        self.assertEqual(key[-1], 1)
        self.assertNotEqual(key, second["seeds"][-1])

    def test_tempfile_names_are_not_shared(self):
        p = self.start(
            """
            import tempfile

            next(tempfile._get_candidate_names())  # made at import: in the snapshot

            def handler(event, context):
                return tempfile._name_sequence is None
            """
        )
        self.assertEqual(p.call(b"{}")[:2], ("json", b"true"))

    def test_dev_mem_is_recognised(self):
        cases = [
            (stat.S_IFCHR | 0o640, os.makedev(1, 1), True),  # /dev/mem
            (stat.S_IFCHR | 0o666, os.makedev(1, 3), False),  # /dev/null
            (stat.S_IFBLK | 0o660, os.makedev(1, 1), False),  # a block device 1:1
            (stat.S_IFREG | 0o644, 0, False),
        ]
        for mode, rdev, expected in cases:
            fake = types.SimpleNamespace(st_mode=mode, st_rdev=rdev)
            with unittest.mock.patch.object(rt.os, "fstat", return_value=fake):
                self.assertEqual(rt._is_dev_mem(5), expected, (oct(mode), rdev))
        # A closed descriptor is not /dev/mem either.
        r, w = os.pipe()
        os.close(r)
        os.close(w)
        self.assertFalse(rt._is_dev_mem(r))


class BundleTests(unittest.TestCase):
    """--bundle DIR MODULE NAME: a dotted module of a code directory, its
    dependencies in DIR/.ember-site (with .pth files), started in DIR."""

    def setUp(self):
        self.fn = FunctionDir(self)
        self.code = self.fn.path

    def add(self, rel, source):
        path = os.path.join(self.code, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(textwrap.dedent(source))

    def start(self, module, handler="handler"):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "EMBER_ARENA_MIB": "0"}
        argv = PYTHON + [self.fn.runtime, "--bundle", self.code, module, handler]
        process = Process(argv, env=env, cwd=self.code)
        self.addCleanup(process.kill)
        return process

    def test_a_package_module_with_dependencies(self):
        self.add("app/__init__.py", "")
        self.add("app/util.py", "def twice(x):\n    return 2 * x\n")
        self.add(
            "app/main.py",
            """\
            import dep
            from app.util import twice

            DATA = open("data.txt").read().strip()

            def handler(event):
                return {"n": twice(event["n"]), "dep": dep.NAME, "data": DATA, "extra": __import__("extra").X}
            """,
        )
        self.add("data.txt", "payload\n")
        self.add(".ember-site/dep/__init__.py", "NAME = 'dep'\n")
        # A .pth file in the site directory adds its own path, as site-packages would.
        self.add(".ember-site/more/extra.py", "X = 7\n")
        self.add(".ember-site/more.pth", "more\n")
        p = self.start("app.main")
        self.assertEqual(p.ready(), {})
        status, result, _, _ = p.call(b'{"n": 21}')
        self.assertEqual(status, "json")
        self.assertEqual(json.loads(result), {"n": 42, "dep": "dep", "data": "payload", "extra": 7})

    def test_import_failure_shows_the_modules_frames(self):
        self.add("pkg/__init__.py", "")
        self.add("pkg/bad.py", "def f():\n    raise RuntimeError('at import')\n\nf()\n")
        p = self.start("pkg.bad")
        self.assertTrue(p.responses.at_eof(), "no READY expected")
        code, stderr = p.close()
        self.assertEqual(code, 1)
        self.assertIn("RuntimeError: at import", stderr)
        self.assertIn('bad.py", line 2, in f', stderr)
        self.assertNotIn("importlib", stderr)

    def test_missing_module_and_handler(self):
        p = self.start("nothere")
        self.assertTrue(p.responses.at_eof())
        code, stderr = p.close()
        self.assertEqual(code, 1)
        self.assertIn("No module named 'nothere'", stderr)
        self.add("m.py", "x = 1\n")
        p = self.start("m")
        self.assertTrue(p.responses.at_eof())
        self.assertEqual(p.close(), (1, "ember-runtime: m defines no 'handler'\n"))


class StartupTests(unittest.TestCase):
    def start_failing(self, source, handler="handler"):
        fn = FunctionDir(self)
        fn.add("broken.py", source)
        p = fn.start(self, "broken.py", handler)
        self.assertTrue(p.responses.at_eof(), "no READY expected")
        return p.close()

    def test_import_error(self):
        code, stderr = self.start_failing("import no_such_module_here\n")
        self.assertEqual(code, 1)
        self.assertIn("cannot load the handler", stderr)
        self.assertIn("ModuleNotFoundError: No module named 'no_such_module_here'", stderr)
        self.assertIn('broken.py", line 1', stderr)
        self.assertNotIn("importlib", stderr)

    def test_syntax_error(self):
        code, stderr = self.start_failing("def handler(:\n")
        self.assertEqual(code, 1)
        self.assertIn("SyntaxError", stderr)
        self.assertIn("broken.py", stderr)

    def test_missing_or_unusable_handler(self):
        self.assertEqual(self.start_failing("x = 1\n"), (1, "ember-runtime: broken.py defines no 'handler'\n"))
        self.assertEqual(
            self.start_failing("handler = 3\n"), (1, "ember-runtime: 'handler' in broken.py is not callable\n")
        )
        code, stderr = self.start_failing("def handler(a, b, c):\n    pass\n")
        self.assertEqual(code, 1)
        self.assertIn("must accept (event) or (event, context)", stderr)

    def test_usage(self):
        p = Process(PYTHON + [RUNTIME])
        self.addCleanup(p.kill)
        code, stderr = p.close()
        self.assertEqual(code, 2)
        self.assertIn("usage", stderr)


class WaitForCodeTests(unittest.TestCase):
    """`--wait-for-code`: READY without a handler, then LOAD on fd 3."""

    def setUp(self):
        self.fn = FunctionDir(self)

    def start(self, env=None):
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
        full_env.update(env or {})
        p = Process(PYTHON + [self.fn.runtime, "--wait-for-code"], env=full_env, cwd=self.fn.path)
        self.addCleanup(p.kill)
        self.assertEqual(p.ready(), {})
        return p

    def load(self, p, args, env=()):
        body = json.dumps({"args": args, "env": [list(pair) for pair in env]}).encode()
        os.write(p.request_w, b"LOAD %d\n" % len(body) + body)

    def test_load_then_serve(self):
        p = self.start()
        # Written after READY: the base's runtime has not seen it.
        self.fn.add("main.py", "import os\ndef handler(e, c):\n    return [e, os.environ.get('GREETING')]\n")
        self.load(p, ["main.py", "handler"], [("GREETING", "hi")])
        self.assertEqual(p.ready(), {})
        self.assertEqual(p.call(b'{"a": 1}')[:2], ("json", b'[{"a":1},"hi"]'))

    def test_the_arena_is_the_loaded_functions(self):
        p = self.start({"EMBER_ARENA_MIB": "2"})
        self.fn.add("main.py", "def handler(e):\n    return e\n")
        self.load(p, ["main.py", "handler"], [("EMBER_ARENA_MIB", "3")])
        self.assertEqual(p.ready(), {})
        code, stderr = p.close()
        self.assertEqual(code, 0, stderr)
        self.assertIn("2 MiB of heap touched", stderr)  # the base's
        self.assertIn("3 MiB of heap touched", stderr)  # the function's

    def test_load_a_bundle(self):
        p = self.start()
        code = os.path.join(self.fn.path, "code")
        os.makedirs(os.path.join(code, "app"))
        with open(os.path.join(code, "app", "__init__.py"), "w") as f:
            f.write("")
        with open(os.path.join(code, "app", "main.py"), "w") as f:
            f.write("import os\ndef handler(e):\n    return os.getcwd()\n")
        self.load(p, ["--bundle", code, "app.main", "handler"])
        self.assertEqual(p.ready(), {})
        self.assertEqual(p.call(b"{}")[:2], ("json", json.dumps(code).encode()))

    def test_import_failure_shows_the_traceback(self):
        p = self.start()
        self.fn.add("broken.py", "def f():\n    raise RuntimeError('at import')\n\nf()\n")
        self.load(p, ["broken.py", "handler"])
        self.assertTrue(p.responses.at_eof(), "no second READY expected")
        code, stderr = p.close()
        self.assertEqual(code, 1)
        self.assertIn("cannot load the handler", stderr)
        self.assertIn("RuntimeError: at import", stderr)
        self.assertIn('broken.py", line 2, in f', stderr)

    def test_bad_load_messages(self):
        for message, expected in (
            (b"EVENT 2 100\n{}", "expected LOAD"),
            (b"LOAD 4\nnope", "LOAD is not"),
            (b'LOAD 24\n{"args":[1],"env":[]}   ', "must be strings"),
        ):
            p = self.start()
            os.write(p.request_w, message)
            code, stderr = p.close()
            self.assertEqual(code, 1, stderr)
            self.assertIn(expected, stderr)
        p = self.start()
        self.load(p, ["only-one"])
        code, stderr = p.close()
        self.assertEqual(code, 2)
        self.assertIn("LOAD names no handler", stderr)

    def test_end_of_requests_before_load_exits_cleanly(self):
        p = self.start()
        code, stderr = p.close()
        self.assertEqual(code, 0)
        self.assertNotIn("Traceback", stderr)


# --- The hot path, in-process -------------------------------------------------------------

REQUEST_HEADER = struct.Struct("<IIQIII4xQ24s")


def request_header(seq, event_len, flags=0, timeout_ms=1000, unix_time_ns=1_700_000_000_123_456_789, entropy=None):
    """A request header built from hotpath.rs's offsets (not from the runtime's Struct)."""
    header = bytearray(64)
    struct.pack_into("<I", header, 0, int.from_bytes(b"EMRQ", "little"))
    struct.pack_into("<I", header, 4, 1)
    struct.pack_into("<Q", header, 8, seq)
    struct.pack_into("<I", header, 16, flags)
    struct.pack_into("<I", header, 20, event_len)
    struct.pack_into("<I", header, 24, timeout_ms)
    struct.pack_into("<Q", header, 32, unix_time_ns)
    header[40:64] = entropy if entropy is not None else bytes(range(1, 25))
    return bytes(header)


def decode_response(buf):
    """The response as hotpath.rs's decode_response reads it."""
    fields = {
        "magic": bytes(buf[0:4]),
        "version": struct.unpack_from("<I", buf, 4)[0],
        "seq": struct.unpack_from("<Q", buf, 8)[0],
        "status": struct.unpack_from("<I", buf, 16)[0],
        "result_len": struct.unpack_from("<I", buf, 20)[0],
        "stdout_len": struct.unpack_from("<I", buf, 24)[0],
        "stderr_len": struct.unpack_from("<I", buf, 28)[0],
        "flags": struct.unpack_from("<I", buf, 32)[0],
        "handler_ns": struct.unpack_from("<Q", buf, 40)[0],
        "reserved": bytes(buf[36:40]) + bytes(buf[48:64]),
    }
    at = 64
    for name in ("result", "stdout", "stderr"):
        n = fields[name + "_len"]
        fields[name] = bytes(buf[at : at + n])
        at += n
    assert at <= len(buf)
    return fields


class FakeHost:
    """The doorbell: on WAITING it writes the next queued request, as the
    host writes a clone's memory before it runs (event, header, seq last)."""

    def __init__(self, request, response=None):
        self.request = request
        self.response = response
        self.queue = []
        self.rings = []
        self.on_done = None
        # Output chunks, read from the response buffer at each OUTPUT ring
        # (the runtime may reuse the buffer once the ring returns).
        self.chunks = []

    def push(self, seq, event, **fields):
        self.queue.append((seq, event, fields))

    def __call__(self, value):
        self.rings.append(value)
        if value == rt.DOORBELL_OUTPUT:
            self.chunks.append(decode_response(self.response))
            return
        if value == rt.DOORBELL_DONE:
            if self.on_done:
                self.on_done()
            return
        if not self.queue:
            raise AssertionError("the runtime waits but the test queued no request")
        seq, event, fields = self.queue.pop(0)
        header = request_header(seq, len(event), **fields)
        if not fields.get("flags", 0) & rt.REQUEST_FLAG_VIA_PIPE:
            self.request[64 : 64 + len(event)] = event
        self.request[0:8] = header[0:8]
        self.request[16:64] = header[16:64]
        self.request[8:16] = header[8:16]  # seq last


def _fd_open(fd):
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def vm_flags(addr):
    """The VmFlags of this process's mapping that holds addr."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            first = line.split(" ", 1)[0]
            if "-" in first and ":" not in first:
                start, end = (int(x, 16) for x in first.split("-"))
                inside = start <= addr < end
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


class HotPathBufferTests(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="ember-hot-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.n = 0

    def hot_path(self, source, size=rt.DEFAULT_BUFFER_BYTES, response_size=None, pipes=False, restore=None):
        self.n += 1
        path = os.path.join(self.dir, f"hot_handler_{id(self)}_{self.n}.py")
        with open(path, "w") as f:
            f.write(textwrap.dedent(source))
        function = rt.load_function(path, "handler")
        request = bytearray(size)
        response = bytearray(response_size or size)
        self.host = FakeHost(request, response)
        pipe_ends = None
        if pipes:
            request_r, self.request_w = os.pipe()
            self.response_r, response_w = os.pipe()
            for fd in (request_r, self.request_w, self.response_r, response_w):
                self.addCleanup(os.close, fd)
            pipe_ends = rt.Pipes(request_r, response_w)
        hot = rt.HotPath(rt.Runtime(function, restore), pipe_ends, request, response, self.host)
        return hot, request, response

    def test_constants_match_hotpath_rs(self):
        if not os.path.exists(HOTPATH_RS):
            self.fail(f"{HOTPATH_RS} not found: run the tests from a checkout of the repository")
        with open(HOTPATH_RS) as f:
            source = f.read()
        values = {}
        for name, expression in re.findall(r"^\s*(?:pub )?const (\w+): \w+ = ([^;]+);", source, re.M):
            magic = re.fullmatch(r'u32::from_le_bytes\(\*b"(\w{4})"\)', expression)
            shift = re.fullmatch(r"(\w+) << (\d+)", expression)
            if magic:
                values[name] = int.from_bytes(magic.group(1).encode(), "little")
            elif shift:
                values[name] = int(shift.group(1), 0) << int(shift.group(2))
            elif expression in values or expression.startswith("offset_of!"):
                continue  # an alias, or an offset checked below
            else:
                values[name] = int(expression, 0)
        self.assertGreaterEqual(len(values), 15)
        for name, value in values.items():
            self.assertEqual(getattr(rt, name), value, name)
        # The headers are #[repr(C)] structs there: their fields' offsets,
        # summed from the field types, are the runtime's RQ_*/RS_* offsets.
        sizes = {"U32": 4, "U64": 8}
        fields = {
            "RequestLayout": ("RQ_", {"timeout_ms": "TIMEOUT", "unix_time_ns": "TIME"}),
            "ResponseLayout": ("RS_", {}),
        }
        for struct, (prefix, renames) in fields.items():
            body = re.search(r"struct %s \{(.*?)\n\}" % struct, source, re.S)
            self.assertIsNotNone(body, struct)
            offset = 0
            checked = 0
            for field, ty in re.findall(r"^\s*(\w+): ([^,]+),", body.group(1), re.M):
                array = re.fullmatch(r"\[u8; (\w+)\]", ty)
                if array:
                    size = values.get(array.group(1)) or int(array.group(1), 0)
                else:
                    size = sizes[ty]
                if not field.startswith("_"):
                    name = prefix + renames.get(field, field.upper())
                    self.assertEqual(getattr(rt, name), offset, f"{struct}.{field}")
                    checked += 1
                offset += size
            self.assertEqual(offset, 64, struct)
            self.assertGreaterEqual(checked, 8, struct)
        codes = dict(re.findall(r"ResponseStatus::(\w+) => (\d+),", source))
        words = dict(re.findall(r'ResponseStatus::(\w+) => "(\w+)",', source))
        self.assertEqual(set(codes), {"Json", "Bytes", "Error", "ViaPipe", "Output"})
        for variant, code in codes.items():
            constant = "STATUS_" + re.sub(r"(?<!^)(?=[A-Z])", "_", variant).upper()
            self.assertEqual(getattr(rt, constant), int(code), variant)
            if variant not in ("ViaPipe", "Output"):  # never words on a pipe
                self.assertEqual(rt.STATUS_WORDS[int(code)], words[variant].encode(), variant)

    def test_request_header_parsing(self):
        hot, request, _ = self.hot_path("def handler(e, c):\n    return e\n")
        self.assertIsNone(hot.poll_request())  # all zero: seq 0 is "nothing yet"
        header = bytearray(request_header(5, 3, flags=1, timeout_ms=777, unix_time_ns=123456789))
        request[:64] = header
        magic, version, seq, flags, event_len, timeout_ms, unix_time_ns, entropy = hot.poll_request()
        self.assertEqual((magic, version), (rt.REQUEST_MAGIC, rt.LAYOUT_VERSION))
        self.assertEqual((seq, flags, event_len, timeout_ms, unix_time_ns), (5, 1, 3, 777, 123456789))
        self.assertEqual(entropy, bytes(range(1, 25)))
        hot.last_seq = 5
        self.assertIsNone(hot.poll_request(), "the seq already served")
        hot.last_seq = 4
        request[0] ^= 0xFF
        self.assertIsNone(hot.poll_request(), "bad magic")
        request[0] ^= 0xFF
        request[4] = 2
        self.assertIsNone(hot.poll_request(), "another layout version")
        request[4] = 1
        self.assertIsNotNone(hot.poll_request())

    def test_response_layout(self):
        hot, _, response = self.hot_path(
            """
            import sys

            def handler(event, context):
                print("out", event["n"])
                print("err!", file=sys.stderr)
                return {"got": event, "id": context.invocation_id, "timeout": context.timeout_ms,
                        "time": context.unix_time_ns, "hot": context.hot_path}
            """
        )
        response[:] = b"\xaa" * len(response)  # stale bytes must not leak into the header
        self.host.push(9, b'{"n": 1}', timeout_ms=4321, unix_time_ns=1_700_000_000_000_000_001)
        hot.serve_one()
        self.assertEqual(self.host.rings, [rt.DOORBELL_WAITING, rt.DOORBELL_DONE])
        r = decode_response(response)
        result = b'{"got":{"n":1},"id":9,"timeout":4321,"time":1700000000000000001,"hot":true}'
        self.assertEqual(r["magic"], b"EMRS")
        self.assertEqual(r["version"], 1)
        self.assertEqual(r["seq"], 9)
        self.assertEqual(r["status"], 0)
        self.assertEqual((r["result_len"], r["stdout_len"], r["stderr_len"]), (len(result), 6, 5))
        self.assertEqual(r["flags"], 0)
        self.assertGreater(r["handler_ns"], 0)
        self.assertLess(r["handler_ns"], 10**10)
        self.assertEqual(r["reserved"], bytes(20))
        self.assertEqual(r["result"], result)
        self.assertEqual(response[64 + len(result) : 64 + len(result) + 6], b"out 1\n")
        self.assertEqual(r["stderr"], b"err!\n")
        self.assertEqual(hot.last_seq, 9)

        # The next request: the runtime rang WAITING again and served seq 10.
        self.host.push(10, b'{"n": 2}')
        hot.serve_one()
        r = decode_response(response)
        self.assertEqual((r["seq"], r["status"], r["stdout"]), (10, 0, b"out 2\n"))
        self.assertEqual(self.host.rings, [1, 2, 1, 2])

    def test_streaming_pushes_each_line_while_the_handler_runs(self):
        hot, _, response = self.hot_path(
            """
            import sys

            def handler(event, context):
                print("one")
                print("two", file=sys.stderr)
                sys.stdout.write("x" * 5000)  # no newline, but past the push threshold
                sys.stdout.write("tail")
                return "done"
            """
        )
        self.host.push(3, b"{}", flags=rt.REQUEST_FLAG_STREAM)
        hot.serve_one()
        out, err = rt.DOORBELL_OUTPUT, rt.DOORBELL_DONE
        self.assertEqual(self.host.rings, [rt.DOORBELL_WAITING, out, out, out, err])
        chunks = [(c["seq"], c["status"], c["result_len"], c["stdout"], c["stderr"]) for c in self.host.chunks]
        self.assertEqual(
            chunks,
            [(3, rt.STATUS_OUTPUT, 0, b"one\n", b""), (3, 4, 0, b"", b"two\n"), (3, 4, 0, b"x" * 5000, b"")],
        )
        r = decode_response(response)
        self.assertEqual((r["seq"], r["status"], r["result"]), (3, rt.STATUS_JSON, b'"done"'))
        self.assertEqual((r["stdout"], r["stderr"], r["flags"]), (b"tail", b"", 0))
        # The next request without the flag: nothing is pushed.
        self.host.push(4, b"{}")
        hot.serve_one()
        self.assertEqual(self.host.rings[5:], [rt.DOORBELL_WAITING, rt.DOORBELL_DONE])
        self.assertEqual(decode_response(response)["stdout"], b"one\n" + b"x" * 5000 + b"tail")

    def test_streaming_splits_chunks_to_the_buffer_and_caps_the_total(self):
        hot, _, response = self.hot_path(
            "def handler(e, c):\n    print('é' * 150)\n    print('b' * 10)\n    return 1\n",
            response_size=64 + 100,
        )
        saved = rt.STREAM_OUTPUT_CAP
        rt.STREAM_OUTPUT_CAP = 305
        self.addCleanup(setattr, rt, "STREAM_OUTPUT_CAP", saved)
        self.host.push(1, b"{}", flags=rt.REQUEST_FLAG_STREAM)
        hot.serve_one()
        sizes = [len(c["stdout"]) for c in self.host.chunks]
        self.assertTrue(all(size <= 100 for size in sizes), sizes)
        streamed = b"".join(c["stdout"] for c in self.host.chunks)
        # 301 bytes of the first line, then 4 of the second: the cap counts
        # every byte the call pushed.
        self.assertEqual(streamed, ("é" * 150 + "\n").encode() + b"bbbb")
        r = decode_response(response)
        self.assertEqual((r["result"], r["stdout"]), (b"1", b""))
        self.assertEqual(r["flags"], rt.RESPONSE_FLAG_STDOUT_TRUNCATED)

    def test_a_thread_pushing_as_the_handler_returns_never_overwrites_the_response(self):
        hot, _, response = self.hot_path(
            """
            import threading

            pushing = threading.Event()

            def late():
                print("from a thread")

            def handler(event, context):
                threading.Thread(target=late).start()
                pushing.wait(5)
                return "done"
            """
        )
        handler_globals = hot.runtime.function.handler.__globals__
        write_header = hot._write_header

        def slow_output_header(seq, status, *rest):
            # The thread has taken its chunk and written its bytes: the
            # handler returns now, and the thread writes its header late.
            if status == rt.STATUS_OUTPUT and threading.current_thread() is not threading.main_thread():
                handler_globals["pushing"].set()
                time.sleep(0.3)
            write_header(seq, status, *rest)

        hot._write_header = slow_output_header
        self.host.push(5, b"{}", flags=rt.REQUEST_FLAG_STREAM)
        hot.serve_one()
        for thread in threading.enumerate():
            if thread is not threading.main_thread():
                thread.join(5)
        r = decode_response(response)
        self.assertEqual((r["seq"], r["status"], r["result"]), (5, rt.STATUS_JSON, b'"done"'))
        self.assertEqual([c["stdout"] for c in self.host.chunks], [b"from a thread\n"])

    def test_ping_does_not_call_the_handler(self):
        hot, _, response = self.hot_path(
            "calls = []\ndef handler(e, c):\n    calls.append(e)\n    print('called')\n    return len(calls)\n"
        )
        response[:] = b"\xaa" * len(response)
        self.host.push(1, b"", flags=rt.REQUEST_FLAG_PING)
        hot.serve_one()
        r = decode_response(response)
        self.assertEqual((r["magic"], r["seq"], r["status"], r["result"]), (b"EMRS", 1, 0, b"null"))
        self.assertEqual((r["stdout_len"], r["stderr_len"], r["flags"], r["handler_ns"]), (0, 0, 0, 0))
        self.assertEqual(r["reserved"], bytes(20))
        self.host.push(2, b"{}")
        hot.serve_one()
        r = decode_response(response)
        self.assertEqual((r["seq"], r["result"], r["stdout"]), (2, b"1", b"called\n"))
        self.assertEqual(self.host.rings, [1, 2, 1, 2])

    def test_statuses(self):
        hot, _, response = self.hot_path(
            """
            def handler(event, context):
                if event == "bytes":
                    return b"\\x00\\x01"
                raise KeyError(event)
            """
        )
        self.host.push(1, b'"bytes"')
        hot.serve_one()
        r = decode_response(response)
        self.assertEqual((r["seq"], r["status"], r["result"]), (1, 1, b"\x00\x01"))
        self.host.push(2, b'"boom"')
        hot.serve_one()
        r = decode_response(response)
        self.assertEqual((r["seq"], r["status"]), (2, 2))
        error = json.loads(r["result"])
        self.assertEqual((error["type"], error["message"]), ("KeyError", "'boom'"))
        self.assertIn("raise KeyError(event)", error["traceback"])

    def test_event_len_past_the_buffer(self):
        hot, request, response = self.hot_path("def handler(e, c):\n    return e\n", size=4096)
        self.host.push(3, b"")
        hot.doorbell(rt.DOORBELL_WAITING)
        struct.pack_into("<I", request, 20, 4096 - 64 + 1)
        hot.answer(hot.wait_for_request())
        r = decode_response(response)
        self.assertEqual((r["seq"], r["status"]), (3, 2))
        self.assertEqual(json.loads(r["result"])["type"], "EmberRequestError")

    def test_output_truncation_flags(self):
        hot, _, response = self.hot_path(
            """
            import sys

            def handler(event, context):
                sys.stdout.write("é" * 40000)  # 80000 bytes of UTF-8
                sys.stderr.write("e" * 70000)
                sys.stderr.write("more")
                return 1
            """
        )
        self.host.push(1, b"{}")
        hot.serve_one()
        r = decode_response(response)
        self.assertEqual(r["flags"], rt.RESPONSE_FLAG_STDOUT_TRUNCATED | rt.RESPONSE_FLAG_STDERR_TRUNCATED)
        self.assertEqual(r["stdout_len"], 65536)  # a whole number of 2-byte characters
        self.assertEqual(r["stdout"].decode(), "é" * 32768)
        self.assertEqual(r["stderr"], b"e" * 65536)

    def test_oversize_response_goes_to_the_pipe_after_done(self):
        hot, _, response = self.hot_path(
            """
            def handler(event, context):
                print("printed")
                return "x" * event
            """,
            size=8192,
            pipes=True,
        )
        pipe_empty_at_done = []
        self.host.on_done = lambda: pipe_empty_at_done.append(not select.select([self.response_r], [], [], 0)[0])
        self.host.push(7, b"10000")  # a 10002-byte result for an 8 KiB buffer
        hot.serve_one()
        r = decode_response(response)
        self.assertEqual(r["seq"], 7)
        self.assertEqual(r["status"], rt.STATUS_VIA_PIPE)
        self.assertEqual((r["result_len"], r["stdout_len"], r["stderr_len"]), (0, 0, 0))
        self.assertEqual(pipe_empty_at_done, [True], "RESULT written after DONE")
        reader = Reader(self.response_r)
        self.assertEqual(reader.line(), b"RESULT json 10002 8 0")
        self.assertEqual(reader.exactly(10002), b'"' + b"x" * 10000 + b'"')
        self.assertEqual(reader.exactly(8), b"printed\n")

        # Exactly full still fits.
        self.host.on_done = None
        self.host.push(8, b"%d" % (8192 - 64 - 2 - 8))
        hot.serve_one()
        r = decode_response(response)
        self.assertEqual((r["seq"], r["status"], r["result_len"] + r["stdout_len"]), (8, 0, 8192 - 64))

    def test_via_pipe_flag_reads_the_event_from_the_pipe(self):
        hot, request, response = self.hot_path(
            """
            def handler(event, context):
                print("big one")
                return {"len": len(event), "timeout": context.timeout_ms, "id": context.invocation_id,
                        "hot": context.hot_path}
            """,
            size=4096,
            pipes=True,
        )
        event = json.dumps("y" * 20000).encode()
        os.write(self.request_w, b"EVENT %d 2500\n" % len(event) + event)
        self.host.push(11, b"", flags=rt.REQUEST_FLAG_VIA_PIPE)
        hot.serve_one()
        r = decode_response(response)
        self.assertEqual((r["seq"], r["status"], r["result_len"]), (11, rt.STATUS_VIA_PIPE, 0))
        reader = Reader(self.response_r)
        header = reader.line().split(b" ")
        self.assertEqual(header[:2], [b"RESULT", b"json"])
        result = json.loads(reader.exactly(int(header[2])))
        self.assertEqual(result, {"len": 20000, "timeout": 2500, "id": 11, "hot": True})
        self.assertEqual(reader.exactly(int(header[3])), b"big one\n")

    def test_random_is_reseeded_from_the_request(self):
        source = "import random\ndef handler(e, c):\n    return random.getrandbits(64)\n"
        results = []
        for entropy in (b"a" * 24, b"a" * 24, b"b" * 24):
            hot, _, response = self.hot_path(source)
            random.seed(len(results))  # whatever state the snapshot had
            self.host.push(1, b"{}", entropy=entropy)
            hot.serve_one()
            results.append(decode_response(response)["result"])
        self.assertEqual(results[0], results[1])
        self.assertNotEqual(results[0], results[2])

    def test_on_restore_hooks_run_after_the_reseed_not_in_the_warm_up(self):
        source = """
            import random
            import ember

            values = []

            @ember.on_restore
            def hook():
                values.append(random.getrandbits(64))

            def handler(e, c):
                return values
            """
        self.addCleanup(sys.modules.pop, "ember", None)
        results = []
        for entropy in (b"a" * 24, b"a" * 24, b"b" * 24):
            restore = rt.Restore()
            rt.install_ember_module(restore)
            hot, _, response = self.hot_path(source, restore=restore)
            hot.warm_up()  # the runtime's own rounds: no user hook
            self.host.push(1, b"{}", entropy=entropy)
            hot.serve_one()
            results.append(json.loads(decode_response(response)["result"]))
        self.assertEqual([len(r) for r in results], [1, 1, 1])
        self.assertEqual(results[0], results[1])
        self.assertNotEqual(results[0], results[2])

    def test_warm_up_leaves_a_fresh_start(self):
        hot, request, response = self.hot_path(
            "calls = []\ndef handler(e, c):\n    calls.append(e)\n    return len(calls)\n"
        )
        hot.warm_up()
        self.assertEqual(bytes(request[:4096]), bytes(4096))
        self.assertEqual(bytes(response[:64]), bytes(64))
        self.assertEqual(hot.last_seq, 0)
        self.host.push(1, b"{}")
        hot.serve_one()
        self.assertEqual(decode_response(response)["result"], b"1", "the user's handler was not warmed up")

    def test_take_doorbell_always_closes_dev_mem(self):
        # A pipe stands in for /dev/mem (absent from many hosts, and never
        # to be mapped on one).
        for wanted in (False, True):
            r, w = os.pipe()
            self.addCleanup(os.close, w)
            fake = unittest.mock.patch.multiple(
                rt, DOORBELL_FD=r, _is_dev_mem=lambda fd: fd == r and _fd_open(fd)
            )
            with fake:
                if wanted:
                    with self.assertRaises(OSError):  # mmap of a pipe
                        rt.take_doorbell(True)
                else:
                    self.assertIsNone(rt.take_doorbell(False))
            self.assertFalse(_fd_open(r), f"wanted={wanted}: /dev/mem left open")
        # Anything else on that fd goes too: the runtime passes nothing on
        # but its pipes.
        for wanted in (False, True):
            r, w = os.pipe()
            self.addCleanup(os.close, w)
            with unittest.mock.patch.object(rt, "DOORBELL_FD", r):
                if wanted:
                    with self.assertRaises(OSError):
                        rt.take_doorbell(True)
                else:
                    self.assertIsNone(rt.take_doorbell(False))
            self.assertFalse(_fd_open(r), f"wanted={wanted}: fd left open")

    def test_doorbell_code(self):
        # mov [rdi], esi; ret: one 32-bit store of the second argument to the
        # first. build_doorbell maps the doorbell page from /dev/mem, which
        # on a host would be real physical memory: it only runs in guests.
        self.assertEqual(rt.doorbell_code(), bytes([0x89, 0x37, 0xC3]))

    def test_allocate_buffer(self):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        buf, addr = rt.allocate_buffer(rt.DEFAULT_BUFFER_BYTES, libc)
        self.assertEqual(len(buf), rt.DEFAULT_BUFFER_BYTES)
        self.assertEqual(addr % rt.PAGE_SIZE, 0)
        self.assertEqual(ctypes.string_at(addr, 4), bytes(4))
        buf[0:4] = b"EMRQ"
        self.assertEqual(ctypes.string_at(addr, 4), b"EMRQ", "the address is the buffer's")
        self.assertIn("lo", vm_flags(addr), "mlocked")
        self.assertIn("nh", vm_flags(addr), "no huge pages")

    @unittest.mock.patch.dict(os.environ)
    def test_hot_path_size(self):
        os.environ.pop("EMBER_HOT_PATH_BYTES", None)
        self.assertEqual(rt.hot_path_size(), 256 << 10)
        os.environ["EMBER_HOT_PATH_BYTES"] = "5000"
        self.assertEqual(rt.hot_path_size(), 8192)
        for bad in ("64", str((16 << 20) + 1), "x"):
            os.environ["EMBER_HOT_PATH_BYTES"] = bad
            with self.assertRaises(ValueError):
                rt.hot_path_size()


# --- The hot path, end to end in a child process ------------------------------------------


class HotPathProcessTests(unittest.TestCase):
    def test_through_the_childs_memory(self):
        fn = FunctionDir(self)
        fn.add_example("info.py")
        p = fn.start(self, "info.py", env={"EMBER_HOT_PATH": "1", "EMBER_HOT_PATH_TEST": "1"})
        stderr_lines = queue.Queue()
        stderr_reader = threading.Thread(target=lambda: [stderr_lines.put(line) for line in p.proc.stderr])
        stderr_reader.start()

        def stop():  # the child spins, waiting: end it, then its stderr reader
            p.proc.kill()
            p.proc.wait()
            stderr_reader.join(TIMEOUT_S)

        self.addCleanup(stop)

        def next_doorbell():
            while True:
                line = stderr_lines.get(timeout=TIMEOUT_S)
                if line.startswith(b"EMBER_DOORBELL "):
                    return int(line.split()[1])
                sys.stderr.write(line.decode())

        ready = p.ready()
        request, response = ready["hot_path"]["request"], ready["hot_path"]["response"]
        for buf in (request, response):
            self.assertEqual(buf["len"], rt.DEFAULT_BUFFER_BYTES)
            self.assertEqual(buf["addr"] % rt.PAGE_SIZE, 0)
        try:
            mem = open(f"/proc/{p.proc.pid}/mem", "r+b", buffering=0)
        except OSError as exc:
            self.fail(f"this test needs to write the child's memory through /proc/<pid>/mem (run the tests as root): {exc}")
        self.addCleanup(mem.close)

        def poke(addr, data):
            mem.seek(addr)
            mem.write(data)

        def peek(addr, n):
            mem.seek(addr)
            return mem.read(n)

        def minor_faults():
            with open(f"/proc/{p.proc.pid}/stat") as f:
                return int(f.read().rsplit(")", 1)[1].split()[7])

        big = "z" * 200000  # over glibc's default mmap threshold
        events = [(b'{"first": true}', {"first": True}), (b"\x00\x01", "0001"), (json.dumps(big).encode(), big)]
        for seq, (event, decoded) in enumerate(events, 1):
            self.assertEqual(next_doorbell(), rt.DOORBELL_WAITING)
            faults = minor_faults()
            header = request_header(seq, len(event), timeout_ms=999, unix_time_ns=42)
            poke(request["addr"] + 64, event)
            poke(request["addr"], header[:8])
            poke(request["addr"] + 16, header[16:])
            poke(request["addr"] + 8, header[8:16])  # seq last
            self.assertEqual(next_doorbell(), rt.DOORBELL_DONE)
            # Every page the request used was touched before READY (in a
            # guest, a first touch costs milliseconds).
            self.assertEqual(minor_faults() - faults, 0, f"page faults serving request {seq}")
            r = decode_response(peek(response["addr"], response["len"]))
            self.assertEqual((r["magic"], r["version"], r["seq"], r["status"]), (b"EMRS", 1, seq, 0))
            self.assertGreater(r["handler_ns"], 0)
            info = json.loads(r["result"])
            self.assertEqual(info["invocation_id"], seq)
            self.assertEqual((info["timeout_ms"], info["unix_time_ns"], info["hot_path"]), (999, 42, True))
            self.assertEqual(info["event"], decoded)
            kind = type(decoded).__name__ if seq != 2 else "bytes"
            self.assertEqual(r["stdout"], b"info: called with %s\n" % kind.encode())
            self.assertEqual(r["stderr"], b"info: a line on stderr\n")
        self.assertEqual(next_doorbell(), rt.DOORBELL_WAITING)


# --- The exec runtime example ---------------------------------------------------------------


class EchoShTests(unittest.TestCase):
    def shells(self):
        """(name, argv prefix, PATH) for each available POSIX shell."""
        found = []
        dash = shutil.which("dash")
        if dash:
            found.append(("dash", [dash], os.environ.get("PATH", "/usr/bin:/bin")))
        busybox = shutil.which("busybox")
        if busybox:
            # busybox's own head and printf too, not the host's coreutils.
            bin_dir = tempfile.mkdtemp(prefix="ember-busybox-")
            self.addCleanup(shutil.rmtree, bin_dir, True)
            for applet in ("head", "printf", "sh"):
                os.symlink(busybox, os.path.join(bin_dir, applet))
            found.append(("busybox", [busybox, "sh"], bin_dir))
        if not found:
            self.fail("this test needs dash or busybox (apt-get install dash; scripts/setup installs busybox-static)")
        return found

    def test_echo_sh(self):
        script = os.path.join(EXAMPLES, "echo.sh")
        events = [b'{"a": 1}', b'"trailing newlines"\n\n', b"\x00nul\x00 and \xff", b"", b"x" * 200000, b"[]"]
        for name, shell, path in self.shells():
            with self.subTest(shell=name):
                p = Process(shell + [script], env={"PATH": path})
                self.addCleanup(p.kill)
                self.assertEqual(p.ready(), {})
                for event in events:
                    status, result, out, err = p.call(event)
                    self.assertEqual((status, out, err), ("json", b"", b""))
                    self.assertEqual(result, event)
                self.assertEqual(p.close(), (0, ""))

    def test_echo_sh_bad_header(self):
        for name, shell, path in self.shells():
            with self.subTest(shell=name):
                p = Process(shell + [os.path.join(EXAMPLES, "echo.sh")], env={"PATH": path})
                self.addCleanup(p.kill)
                p.ready()
                os.write(p.request_w, b"EVENT -1 5\n")
                code, stderr = p.close()
                self.assertEqual(code, 1)
                self.assertIn("bad event length", stderr)


# --- Keeping the handler's memory mapped ---------------------------------------------------

# A child that switches to the runtime's memory settings (or not), pre-touches
# ARENA MiB and then allocates ~100 MB of small and large objects three times,
# printing the minor faults of each round.
_FAULTS_CHILD = textwrap.dedent(
    """
    import importlib.util, resource, sys
    spec = importlib.util.spec_from_file_location("ember_runtime", sys.argv[1])
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    mode, arena = sys.argv[2], int(sys.argv[3])
    if mode == "keep":
        assert rt.Memory(rt._libc()).keep_memory()
        rt.Memory.pretouch(arena << 20)

    def work():
        rows = [{"id": i, "name": "user%d" % i} for i in range(250000)]
        blobs = [b"x" * 100000 for _ in range(300)]
        return len(rows) + len(blobs)

    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        work()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


class MemoryTests(unittest.TestCase):
    def faults(self, mode, arena):
        """Minor faults of the child's three rounds; it must exit cleanly."""
        done = subprocess.run(
            [sys.executable, "-I", "-c", _FAULTS_CHILD, RUNTIME, mode, str(arena)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        # Exit runs pymalloc's frees through the switched allocator.
        self.assertEqual(done.returncode, 0, done.stderr)
        return [int(line) for line in done.stdout.split()]

    def test_pretouched_heap_takes_a_handlers_allocations_without_faults(self):
        stock = self.faults("stock", 0)
        kept = self.faults("keep", 160)
        # Stock: pymalloc mmaps fresh arenas and glibc mmaps blocks over 128 KiB,
        # and gives them back: every round faults its ~100 MB in again.
        self.assertGreater(min(stock), 10000, stock)
        # Kept: the first round (a fresh clone's only one) reuses the touched heap.
        self.assertLess(max(kept), 1000, kept)

    def test_arena_code(self):
        code, offset = rt.arena_code(0x1111, 0x2222, 0x3333)
        # alloc: mov rdi, rsi; movabs rax, malloc; jmp rax
        self.assertEqual(code[:15], bytes.fromhex("4889f7") + b"\x48\xb8" + struct.pack("<Q", 0x1111) + b"\xff\xe0")
        # free: below the ceiling, tail-call free(ptr); else return
        release = code[offset:]
        self.assertEqual(release[:3], bytes.fromhex("4889f7"))
        self.assertEqual(release[13:18], bytes.fromhex("4839c7730c"))
        self.assertEqual(release[18:30], b"\x48\xb8" + struct.pack("<Q", 0x2222) + b"\xff\xe0")
        self.assertEqual(release[30:], b"\xc3")

    @unittest.mock.patch.dict(os.environ)
    def test_arena_size(self):
        os.environ.pop("EMBER_ARENA_MIB", None)
        self.assertEqual(rt.arena_size(), rt.DEFAULT_ARENA_MIB << 20)
        os.environ["EMBER_ARENA_MIB"] = "0"
        self.assertEqual(rt.arena_size(), 0)
        os.environ["EMBER_ARENA_MIB"] = "3"
        self.assertEqual(rt.arena_size(), 3 << 20)
        for bad in ("-1", "x", str(rt.MAX_ARENA_MIB + 1)):
            os.environ["EMBER_ARENA_MIB"] = bad
            with self.assertRaises(ValueError):
                rt.arena_size()

    def test_bad_arena_setting_is_a_start_error(self):
        fn = FunctionDir(self)
        fn.add_example("echo.py")
        p = fn.start(self, "echo.py", env={"EMBER_ARENA_MIB": "lots"})
        code, stderr = p.close()
        self.assertEqual(code, 1)
        self.assertIn("EMBER_ARENA_MIB='lots' is not a number", stderr)

    def test_a_pretouched_runtime_serves(self):
        fn = FunctionDir(self)
        fn.add_example("echo.py")
        p = fn.start(self, "echo.py", env={"EMBER_ARENA_MIB": "8"})
        p.ready()
        status, result, _, _ = p.call(b'{"a": 1}')
        self.assertEqual((status, json.loads(result)), ("json", {"echo": {"a": 1}}))
        code, stderr = p.close()
        self.assertEqual(code, 0, stderr)
        self.assertIn("8 MiB of heap touched", stderr)


if __name__ == "__main__":
    unittest.main()

"""A handler for ember's function tests: the event's "op" picks what it does."""

import ctypes
import datetime
import gc
import os
import resource
import signal
import socket
import sys
import threading
import time

# Module-level state: every clone starts from the template's copy of it.
counter = 0


def handler(event, context):
    global counter
    op = event.get("op", "echo") if isinstance(event, dict) else "echo"
    if op == "warm":
        return {"warm": True}
    if op == "echo":
        return {"echo": event}
    if op == "count":
        counter += 1
        return {"count": counter}
    if op == "clock":
        # The wall clock, through the vDSO (no system call).
        return {"time": time.time(), "now": datetime.datetime.now().timestamp()}
    if op == "rand":
        return {"rand": os.urandom(16).hex()}
    if op == "fail":
        raise ValueError("bad input: " + str(event.get("why")))
    if op == "loop":
        while True:
            pass
    if op == "print":
        print("to stdout")
        print("to stderr", file=sys.stderr)
        return "printed"
    if op == "drip":
        # Lines with busy gaps between them (guest user mode only: the
        # clock is read through the vDSO), for the streaming tests.
        for i in range(int(event.get("lines", 3))):
            if i:
                until = time.perf_counter() + float(event.get("gap_ms", 500)) / 1e3
                while time.perf_counter() < until:
                    pass
            print(f"line {i}")
            if i == 0:
                print("err", file=sys.stderr)
        return "dripped"
    if op == "big":
        return "x" * int(event["n"])
    if op == "bytes":
        return bytes(range(4))
    if op == "write_root":
        outcome = {}
        for path in ("/probe-write", "/usr/lib/python3/probe-write", "/etc/hostname"):
            try:
                with open(path, "w") as f:
                    f.write("x")
                outcome[path] = "written"
            except OSError as e:
                outcome[path] = e.strerror
        try:
            os.close(os.open("/dev/vda", os.O_WRONLY))
            outcome["/dev/vda"] = "opened"
        except OSError as e:
            outcome["/dev/vda"] = e.strerror
        with open("/tmp/scratch", "w") as f:
            f.write("private")
        outcome["/tmp"] = open("/tmp/scratch").read()
        return outcome
    if op.startswith("recycle_"):
        return recycle(op, event)
    raise KeyError("unknown op " + op)


# --- recycled clones: what an invocation leaves behind, and what the next
# one can find (tests/recycle.rs). Everything below changes guest state on
# purpose; a reset must undo all of it.

# A fixed address no mapping of the runtime uses.
FIXED_ADDR = 0x7E0000000000
PAGE = 4096
leftovers = []


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return ctypes, libc


def _page_present(addr):
    """Whether the guest kernel has a page-table entry for addr."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // PAGE * 8)
        entry = int.from_bytes(f.read(8), "little")
    return bool(entry >> 63)


def _map_fixed(libc):
    # PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED_NOREPLACE
    return libc.mmap(FIXED_ADDR, PAGE, 3, 0x02 | 0x20 | 0x100000, -1, 0)


def _adversary(step):
    """One of the things a handler can change, chosen by step (its modules
    are imported with the handler, as a real handler's would be)."""
    kind = step % 12
    if kind == 0:
        leftovers.append(bytearray(os.urandom(64)) * 4096)  # heap, 256 KiB
    elif kind == 1:
        globals()["planted"] = os.urandom(32).hex()
    elif kind == 2:
        with open("/tmp/leftover-%d" % step, "w") as f:
            f.write("x" * 10000)
    elif kind == 3:
        with open("/dev/shm/leftover", "w") as f:
            f.write("shm")
    elif kind == 4:
        os.environ["LEFTOVER"] = str(step)
        os.chdir("/tmp")
    elif kind == 5:
        ctypes, libc = _libc()
        addr = _map_fixed(libc)
        if addr not in (None, 2**64 - 1):
            ctypes.memset(addr, 0x5A, PAGE)
        libc.mprotect(addr, PAGE, 1)
    elif kind == 6:
        t = threading.Thread(target=lambda: [None for _ in iter(int, 1)], daemon=True)
        t.start()  # left spinning
    elif kind == 7:
        signal.signal(signal.SIGUSR1, lambda *a: None)
        signal.setitimer(signal.ITIMER_REAL, 30.0)
    elif kind == 8:
        leftovers.append(open("/tmp/fd-leftover", "w"))
        leftovers.append(socket.socketpair())
    elif kind == 9:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    elif kind == 10:
        if step % 36 == 10:
            pid = os.fork()
            if pid == 0:
                while True:
                    pass
    elif kind == 11:
        leftovers.clear()
        gc.collect()
    return kind


def _search(half_a, half_b):
    """Where the secret half_a + half_b can be found: this process's
    readable and writable memory, files under /tmp, /dev/shm and /run, the
    environment. The whole secret is only ever put together in a mapping
    of its own (skipped), and memory is searched with libc's memmem, so
    the search makes no copy of it that it could then find."""
    ctypes, libc = _libc()
    libc.memmem.restype = ctypes.c_void_p
    libc.memmem.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
    n = len(half_a) + len(half_b)
    needle = libc.mmap(None, PAGE, 3, 0x02 | 0x20, -1, 0)
    ctypes.memmove(needle, half_a, len(half_a))
    ctypes.memmove(needle + len(half_a), half_b, len(half_b))
    found = []
    with open("/proc/self/maps") as maps:
        regions = [line.split() for line in maps]
    for fields in regions:
        start, end = (int(x, 16) for x in fields[0].split("-"))
        name = fields[5] if len(fields) > 5 else ""
        if "r" not in fields[1] or "w" not in fields[1] or name.startswith("[v"):
            continue
        if start <= needle < end or end - start > (64 << 20):
            continue
        if libc.memmem(start, end - start, needle, n):
            found.append("memory %s %s" % (fields[0], name))
    for top in ("/tmp", "/dev/shm", "/run"):
        for root, _dirs, files in os.walk(top):
            for name in files:
                path = os.path.join(root, name)
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError:
                    continue
                if ctypes.c_void_p(libc.memmem(data, len(data), needle, n)).value:
                    found.append(path)
    for key, value in os.environ.items():
        if (half_a + half_b).hex() in value:
            found.append("environ " + key)
    libc.munmap(needle, PAGE)
    return found


def recycle(op, event):
    if op == "recycle_state":
        # What a fresh clone sees; compared across invocations.
        return {
            "counter": counter,
            "planted": globals().get("planted"),
            "leftovers": len(leftovers),
            "tmp": sorted(os.listdir("/tmp")),
            "shm": sorted(os.listdir("/dev/shm")),
            "env": os.environ.get("LEFTOVER"),
            "cwd": os.getcwd(),
            "fixed_present": _page_present(FIXED_ADDR),
        }
    if op == "recycle_adversary":
        return {"kind": _adversary(int(event["step"]))}
    if op == "recycle_map_fixed":
        ctypes, libc = _libc()
        addr = _map_fixed(libc)
        if addr != FIXED_ADDR:
            return {"mapped": False, "errno": ctypes.get_errno()}
        ctypes.memmove(FIXED_ADDR, b"ember-marker", 12)
        return {"mapped": True, "present": _page_present(FIXED_ADDR)}
    if op == "recycle_probe_fixed":
        # In a fresh clone nothing is at FIXED_ADDR: map it anew and read
        # it. The read must fault (the kernel then has an entry) and see
        # zeros; a translation left over from an earlier invocation would
        # be read without a fault.
        ctypes, libc = _libc()
        before = _page_present(FIXED_ADDR)
        addr = _map_fixed(libc)
        if addr != FIXED_ADDR:
            return {"mapped_before": True, "errno": ctypes.get_errno()}
        data = ctypes.string_at(FIXED_ADDR, 12)
        return {
            "mapped_before": before,
            "data": data.hex(),
            "present_after_read": _page_present(FIXED_ADDR),
        }
    if op == "recycle_plant":
        secret = bytes.fromhex(event["secret"])
        globals()["planted"] = secret
        leftovers.append(bytearray(secret) * 1000)
        with open("/tmp/secret", "wb") as f:
            f.write(secret)
        with open("/dev/shm/secret", "wb") as f:
            f.write(secret)
        os.environ["SECRET"] = secret.hex()
        print(secret.hex())
        return {"planted": len(secret)}
    if op == "recycle_search":
        # The secret's halves arrive separately, so this request does not
        # carry it whole.
        return {"found": _search(bytes.fromhex(event["a"]), bytes.fromhex(event["b"]))}
    raise KeyError("unknown op " + op)

"""A handler for ember's function tests: the event's "op" picks what it does."""

import os
import sys

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
    raise KeyError("unknown op " + op)

"""Returns the event and the context the runtime gave, and prints a line
to stdout and one to stderr (both captured into the response)."""

import random
import sys


def handler(event, context):
    print("info: called with", type(event).__name__)
    print("info: a line on stderr", file=sys.stderr)
    return {
        "event": event if not isinstance(event, bytes) else event.hex(),
        "invocation_id": context.invocation_id,
        "timeout_ms": context.timeout_ms,
        "unix_time_ns": context.unix_time_ns,
        "hot_path": context.hot_path,
        "random": random.getrandbits(64),
        "python": sys.version.split()[0],
    }

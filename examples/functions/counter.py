"""Counts its calls in a module-level variable.

In ember every invocation runs in a fresh clone of the function's snapshot,
so this returns 1 every time: no state survives from one event to the next.
(Run with the runtime directly, as the tests do, it counts 1, 2, 3, ...)
"""

calls = 0


def handler(event, context):
    global calls
    calls += 1
    return calls

"""Fails at import time: its traceback must reach whoever created it."""


def helper():
    raise RuntimeError("broken at import on purpose")


helper()


def handler(event, context):
    return event

"""Always fails: the result is an error object with type ValueError."""


def handler(event, context):
    raise ValueError(f"this function always fails (event: {event!r})")

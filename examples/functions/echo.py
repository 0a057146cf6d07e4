"""Returns the event it was given: {"echo": <event>}."""


def handler(event, context):
    return {"echo": event}

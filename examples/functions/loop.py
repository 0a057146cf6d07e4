"""Never returns: the host kills it at the invocation's timeout."""


def handler(event, context):
    while True:
        pass

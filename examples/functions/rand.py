"""Returns 16 random bytes from the kernel, as 32 hex digits.

Clones of one snapshot must not share randomness: two invocations should
never return the same value.
"""

import os


def handler(event, context):
    return os.urandom(16).hex()

"""A bundle handler: a package with a sibling module and a data file."""

import os

from app.util import shout

# Read once, at import: in the template, so every clone has it in memory.
with open(os.path.join(os.path.dirname(__file__), "data", "greeting.txt")) as f:
    GREETING = f.read().strip()


def handler(event, context):
    name = event.get("name", "world") if isinstance(event, dict) else "world"
    return {
        "greeting": shout(f"{GREETING}, {name}"),
        "file": __file__,
        "cwd": os.getcwd(),
    }

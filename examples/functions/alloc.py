"""Allocates ~100 MB of fresh Python objects per call, as a handler that
parses or builds a large data set does: 250,000 small dicts (pymalloc's
arenas) and 300 blobs of 100 kB (glibc's heap), all alive at once.

Every page of that is a guest page fault unless the runtime's heap already
holds it mapped: see "What makes a handler slow" in the README. The event
may scale it: {"rows": N, "blobs": N, "blob_bytes": N}.
"""


def handler(event, context):
    event = event if isinstance(event, dict) else {}
    rows = int(event.get("rows", 250_000))
    blobs = int(event.get("blobs", 300))
    blob_bytes = int(event.get("blob_bytes", 100_000))
    table = [{"id": i, "name": "user%d" % i} for i in range(rows)]
    data = [b"x" * blob_bytes for _ in range(blobs)]
    return {
        "rows": len(table),
        "last": table[-1]["name"] if table else None,
        "bytes": sum(len(d) for d in data),
    }

"""A numpy matrix computation; `random` is numpy's global generator, which
the runtime reseeds in every clone."""

import numpy as np

MATRIX = np.arange(16, dtype=np.float64).reshape(4, 4)


def handler(event, context):
    n = int(event.get("n", 4)) if isinstance(event, dict) else 4
    m = np.eye(n) * 2.0
    return {
        "trace": float(np.trace(m @ m)),
        "sum": float(MATRIX.sum()),
        "random": float(np.random.random()),
        "numpy": np.__version__,
    }

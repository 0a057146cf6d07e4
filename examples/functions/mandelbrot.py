"""A pure-python compute kernel: the Mandelbrot set on a grid, counted.

No allocation to speak of and no system call: user-mode work only, which
runs at native speed in a guest. The event may set {"size": N, "iterations": N}.
"""


def handler(event, context):
    event = event if isinstance(event, dict) else {}
    size = max(1, min(int(event.get("size", 120)), 2000))
    limit = max(1, min(int(event.get("iterations", 50)), 10_000))
    inside = 0
    for row in range(size):
        ci = row * 2.4 / size - 1.2
        for col in range(size):
            cr = col * 3.0 / size - 2.1
            zr = zi = 0.0
            for _ in range(limit):
                zr, zi = zr * zr - zi * zi + cr, 2.0 * zr * zi + ci
                if zr * zr + zi * zi > 4.0:
                    break
            else:
                inside += 1
    return {"size": size, "iterations": limit, "inside": inside}

"""An image thumbnail with Pillow: the image comes in the event as base64,
the thumbnail goes back as base64.

Event: {"image": "<base64 of a PNG, JPEG, GIF...>", "size": [W, H], "format": "PNG"}
Result: {"thumbnail": "<base64>", "format": ..., "width": ..., "height": ...,
         "source": [W, H]}
"""

import base64
import io

from PIL import Image

FORMATS = ("PNG", "JPEG", "WEBP")


def _round_trip(image, fmt):
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


# At import, so that the template holds it and no clone pays for it: Pillow
# registers its format plugins lazily, on the first open() or save(), and
# the encoders' code and tables are first touched on first use.
Image.preinit()
_sample = Image.new("RGB", (32, 32), (200, 120, 40))
for _fmt in FORMATS:
    with Image.open(io.BytesIO(_round_trip(_sample, _fmt))) as _decoded:
        _decoded.thumbnail((8, 8))
del _sample, _fmt, _decoded


def handler(event, context):
    if not isinstance(event, dict) or "image" not in event:
        raise ValueError('the event needs "image": the picture as base64')
    size = event.get("size", [64, 64])
    fmt = str(event.get("format", "PNG")).upper()
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    with Image.open(io.BytesIO(base64.b64decode(event["image"], validate=True))) as image:
        source = image.size
        image.thumbnail((int(size[0]), int(size[1])))
        if fmt == "JPEG" and image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        data = _round_trip(image, fmt)
        width, height = image.size
    return {
        "thumbnail": base64.b64encode(data).decode("ascii"),
        "format": fmt,
        "width": width,
        "height": height,
        "source": list(source),
    }

"""Bring any decoded image to 8-bit RGB without damaging it, and check an image file fully at load time.

``PIL.Image.convert("RGB")`` is right for 8-bit modes but not for all: a 16-bit grayscale PNG opens as
``I;16`` (values 0..65535) and ``convert`` clips every value above 255, so a typical 16-bit photo
comes out ~100 % white; a palette image with a transparency chunk warns and may lose its
transparency. :func:`to_rgb` scales high-bit-depth modes to 8 bit first. Every place that feeds
images to an encoder goes through it (feature encoding, the synthetic set's initialisation, the
asymmetric experts).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image as PILImage

__all__ = ["to_rgb", "check_image_file"]

# Modes whose values are not 0..255: integer 16 / 32 bit and float.
_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(image: PILImage.Image) -> PILImage.Image:
    """``image`` as 8-bit RGB: 16-bit and 32-bit integer images scaled by their bit depth, float images by [0, 1].

    - ``I;16*`` (16-bit PNG / TIFF): ``value / 257`` (65535 → 255).
    - ``I`` (32-bit integer; how some decoders hand over 16-bit data): ``/ 257`` when the values fit in
      16 bits, ``/ 16843009`` (2³²−1 → 255) otherwise; negative values clip to 0.
    - ``F`` (float): values in [0, 1] are scaled by 255, larger ranges are clipped to 0..255.
    - ``P`` with transparency goes through ``RGBA`` (PIL's own advice); alpha is dropped, as for ``RGBA`` / ``LA``.
    - Everything else: ``convert("RGB")``.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            scale = 255.0 if values.size and np.nanmax(values) <= 1.0 else 1.0
        elif image.mode == "I" and values.size and values.max() > 65535:
            scale = 255.0 / 4294967295.0
        else:
            scale = 255.0 / 65535.0
        gray = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
        return PILImage.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def check_image_file(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming ``path`` unless it is a complete, decodable image.

    Cheap for the common cases: PNG chunks are checked (CRCs, truncation) by ``verify`` without decoding
    pixels; a JPEG is decoded only when its end-of-image marker is missing from its last bytes (a truncated
    file); other formats are decoded once.
    """
    path = os.fspath(path)
    try:
        with PILImage.open(path) as image:
            kind = image.format
            image.verify()  # PNG: every chunk and its CRC; reads the file, decodes nothing
        if kind == "JPEG":
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - 4096))
                complete = b"\xff\xd9" in f.read()
        else:
            complete = kind == "PNG"
        if not complete:  # decode it fully: a truncated JPEG (or another format) fails here
            with PILImage.open(path) as image:
                image.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... for damaged files
        raise ValueError(f"Image file {path} is not a readable image ({type(err).__name__}: {err}); it is truncated "
                         "or damaged: replace it, or remove its rows from the annotations") from err

"""Image I/O around SemClip: safe loading, data URLs, and the real photos that ship in packages."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

from PIL import Image

# vLLM's own limit (VLLM_MAX_IMAGE_PIXELS), checked from the header before decoding.
DEFAULT_MAX_IMAGE_PIXELS = 178_956_970


class ImageTooLargeError(ValueError):
    pass


def max_image_pixels() -> int:
    return int(os.environ.get("VLLM_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS))


def defer_pixel_limit_to_vllm() -> None:
    """Make vLLM's pixel limit the one that applies, so an over-limit image is a 400.

    vLLM 0.32's image loader opens the header, checks ``VLLM_MAX_IMAGE_PIXELS`` and
    raises a ValueError (HTTP 400) before decoding. But PIL's own decompression-bomb
    check runs first, inside ``Image.open``, and its ``DecompressionBombError`` is
    not caught there, so the client got a 500 for an image just over the limit.
    While vLLM's limit is active we switch PIL's check off; vLLM's check still
    rejects the image from its header, before any pixel is decoded.
    """
    if max_image_pixels() > 0:
        Image.MAX_IMAGE_PIXELS = None


def load_image(path: str | Path) -> Image.Image:
    """Open an image, refusing one over the pixel limit before its pixels are decoded."""
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{path}: {exc}") from exc
    except (OSError, Image.UnidentifiedImageError) as exc:
        raise ValueError(f"cannot read an image from {path}: {exc}") from exc
    with im:
        w, h = im.size
        limit = max_image_pixels()
        if limit > 0 and w * h > limit:
            raise ImageTooLargeError(f"{path}: {w}x{h} = {w * h} pixels exceeds the limit of {limit} (VLLM_MAX_IMAGE_PIXELS)")
        try:
            im.load()
        except OSError as exc:
            raise ValueError(f"{path}: corrupt or truncated image: {exc}") from exc
        return im.copy()


def to_data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    mime = "jpeg" if fmt.upper() in ("JPG", "JPEG") else fmt.lower()
    return f"data:image/{mime};base64,{base64.b64encode(buf.getvalue()).decode()}"

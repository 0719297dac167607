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


_patched = False


def answer_oversized_images_with_400() -> None:
    """Make vLLM answer an image over Pillow's decompression-bomb limit with a 400, not a 500.

    vLLM's image loader (``ImageMediaIO.load_bytes``) checks ``VLLM_MAX_IMAGE_PIXELS`` from the
    header, but Pillow's own check runs first, inside ``Image.open``, and its
    ``DecompressionBombError`` is not among the errors vLLM turns into a ValueError (HTTP 400).
    This wraps that one method to translate it, naming the size; Pillow's guard itself stays on.
    Called where SemClip's processing info is built, so only processes that serve SemClip change.
    Idempotent.
    """
    global _patched
    if _patched:
        return
    from vllm.multimodal.media.image import ImageMediaIO

    load_bytes = ImageMediaIO.load_bytes

    def load_bytes_refusing_bombs(self, data: bytes):
        try:
            return load_bytes(self, data)
        except Image.DecompressionBombError as exc:
            raise ValueError(f"Failed to load image: {exc} Set VLLM_MAX_IMAGE_PIXELS and "
                             f"PIL.Image.MAX_IMAGE_PIXELS to allow larger images.") from exc

    ImageMediaIO.load_bytes = load_bytes_refusing_bombs
    _patched = True


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

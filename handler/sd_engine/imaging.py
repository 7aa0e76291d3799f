"""Image encoding: PIL image -> JPEG or PNG bytes with the matching content type."""

from __future__ import annotations

import io

from PIL import Image

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}


def encode_image(image: Image.Image, fmt: str = "jpeg", quality: int = 90) -> tuple[bytes, str]:
    """Return (bytes, content_type). `quality` applies to JPEG only."""
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    elif fmt == "png":
        image.save(buffer, format="PNG")
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buffer.getvalue(), CONTENT_TYPES[fmt]

"""Turning whatever a user passes as an image into a fully decoded RGB ``PIL.Image``, or a clear error.

Decoding happens here, eagerly, so that a truncated file fails with its name instead of deep inside the image
processor, and so that every mode (grayscale, palette, CMYK, 16-bit, alpha) reaches the model as RGB.
"""

from __future__ import annotations

import base64
import io
import os

from PIL import Image


class ErgoImageError(ValueError):
    """An image that cannot be used, with the reason in words."""


def _open(source) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(source))
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if text.startswith("data:image") and "," in text:
            return Image.open(io.BytesIO(base64.b64decode(text.split(",", 1)[1])))
        if text.startswith(("http://", "https://")):
            from transformers.image_utils import load_image  # network: only when the caller asks for a URL

            return load_image(text)
        if not os.path.isfile(text):
            raise ErgoImageError(f"image file not found: {text}")
        return Image.open(text)
    raise ErgoImageError(f"unsupported image type {type(source).__name__}; pass a PIL image, a path or bytes")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL mode; transparent pixels are composited onto white, as a viewer shows them."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        image = _stretch_to_8bit(image)
    return image.convert("RGB")


def _stretch_to_8bit(image: Image.Image) -> Image.Image:
    """16/32-bit or float grayscale mapped onto 0..255 by its own range, instead of clipping above 255."""
    values = image.convert("F")
    low, high = values.getextrema()
    span = (high - low) or 1.0
    return values.point(lambda value: (value - low) * 255.0 / span).convert("L")


def load_image(source, name: str = "image") -> Image.Image:
    """A decoded RGB image from a PIL image, a path, raw bytes, a base64 data URI or (online only) a URL.

    Raises ``ErgoImageError`` naming ``name`` for unreadable, truncated, empty or decompression-bomb-sized (PIL's
    limit) images.
    """
    try:
        image = _open(source)
        image.load()
    except ErgoImageError as error:
        raise ErgoImageError(f"{name}: {error}") from None
    except Image.DecompressionBombError as error:
        raise ErgoImageError(f"{name}: image too large to decode safely ({error})") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise ErgoImageError(f"{name}: cannot read image ({error})") from None
    if image.width == 0 or image.height == 0:
        raise ErgoImageError(f"{name}: image has no pixels ({image.width}x{image.height})")
    return to_rgb(image)

"""Turning whatever a user passes as an image into a fully decoded, upright RGB ``PIL.Image``, or a clear error.

Decoding happens here, eagerly, so that a truncated file fails with its name instead of deep inside the image
processor, and so that every mode (grayscale, palette, CMYK, 16-bit, alpha) reaches the model as RGB, turned the way
a viewer shows it (EXIF orientation).
"""

from __future__ import annotations

import base64
import io
import os

from PIL import ExifTags, Image, ImageOps

URL_TIMEOUT = 30.0
"""Seconds to wait for a server that does not answer, when the caller passed an http(s) URL."""
MAX_DOWNLOAD_BYTES = 256 * 2**20
"""The most an image URL may send (a 16K PNG fits), so a wrong or hostile URL cannot fill memory."""


class ErgoImageError(ValueError):
    """An image that cannot be used, with the reason in words."""


def abbreviate(text: str, limit: int = 200) -> str:
    """``text`` for an error message; a long one (a base64 image) cut to its start and length, not repeated whole."""
    return text if len(text) <= limit else f"{text[:40]}... ({len(text)} characters)"


def _fetch(url: str) -> bytes:
    """The body at ``url``: the only network access, and only for a URL the caller passed."""
    import http.client
    import urllib.error
    import urllib.request

    try:
        request = urllib.request.Request(url, headers={"User-Agent": "ergo-vqa"})
        with urllib.request.urlopen(request, timeout=URL_TIMEOUT) as response:
            final_url, body = response.geturl(), response.read(MAX_DOWNLOAD_BYTES + 1)
        if not final_url.startswith(("http://", "https://")):
            reason = f"redirected to {abbreviate(final_url)}, not http(s)"
        elif len(body) > MAX_DOWNLOAD_BYTES:
            reason = f"more than {MAX_DOWNLOAD_BYTES} bytes"
        else:
            return body
    except urllib.error.HTTPError as error:
        reason = f"HTTP {error.code} {error.reason}"
    except urllib.error.URLError as error:  # offline, refused, unknown host
        reason = str(error.reason)
    except (OSError, ValueError, http.client.HTTPException) as error:  # timeout, reset, malformed URL or reply
        reason = str(error) or type(error).__name__
    raise ErgoImageError(f"cannot fetch {abbreviate(url)} ({reason})")


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
            return Image.open(io.BytesIO(_fetch(text)))
        if os.path.isfile(text):
            return Image.open(text)
        try:  # raw base64 without a ``data:`` prefix, as transformers' ``load_image`` also accepts
            return Image.open(io.BytesIO(base64.b64decode("".join(text.split()), validate=True)))
        except (ValueError, OSError):  # binascii.Error is a ValueError
            message = f"image file not found, and not base64 image data either: {abbreviate(text)}"
            raise ErgoImageError(message) from None
    raise ErgoImageError(f"unsupported image type {type(source).__name__}; pass a PIL image, a path or bytes")


def _check_pixels(image: Image.Image) -> None:
    """Refuse what PIL only warns about: over ``Image.MAX_IMAGE_PIXELS`` (PIL raises only at twice that).

    Checked on the header, before decoding; ``Image.MAX_IMAGE_PIXELS = None`` turns it off, as it does PIL's.
    """
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise ErgoImageError(f"image too large to decode safely ({image.width}x{image.height} = "
                             f"{image.width * image.height} pixels, over PIL's Image.MAX_IMAGE_PIXELS = {limit})")


def upright(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it: cameras store pixels sideways and record the turn in the EXIF orientation.

    An image without a turn to apply comes back as is (no copy); a broken EXIF block is ignored, as viewers do.
    """
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except (OSError, ValueError, SyntaxError):
        return image
    return image if orientation == 1 else ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any PIL mode; transparent pixels are composited onto white, as a viewer shows them."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "La":  # premultiplied alpha: PIL converts it only to straight LA
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
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
    """A decoded, upright RGB image from a PIL image, a path, raw bytes, a base64 data URI, a raw base64 string or
    (online only) an http(s) URL.

    Raises ``ErgoImageError`` naming ``name`` for unreadable, truncated, empty, unreachable or decompression-bomb-sized
    (over PIL's ``Image.MAX_IMAGE_PIXELS``) images.
    """
    try:
        image = _open(source)
        _check_pixels(image)
        image.load()
        image = upright(image)
    except ErgoImageError as error:
        raise ErgoImageError(f"{name}: {error}") from None
    except Image.DecompressionBombError as error:
        raise ErgoImageError(f"{name}: image too large to decode safely ({error})") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise ErgoImageError(f"{name}: cannot read image ({error})") from None
    if image.width == 0 or image.height == 0:
        raise ErgoImageError(f"{name}: image has no pixels ({image.width}x{image.height})")
    return to_rgb(image)

"""Bytes -> an upright RGB image, refusing anything unsafe or broken.

Order matters: sniff for non-raster content, open (header only), check the declared
size against the pixel cap, and only then decode the pixels, fully (``load()``), so a
truncated file fails here and not later inside the engine.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from egm.geometry import upright_size
from egm.images.errors import ImageLoadError

#: Formats we decode. Everything else (EPS runs Ghostscript, PSD, ICO, ...) is refused.
RASTER_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "AVIF", "JPEG2000")

#: Magic bytes of raster formats: content that starts like this but does not open is corrupt, not foreign.
_RASTER_MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
_FOREIGN_MAGIC = {
    b"%PDF": "PDF",
    b"%!PS": "PostScript",
    b"\xc5\xd0\xd3\xc6": "PostScript",
    b"8BPS": "Photoshop (PSD)",
    b"PK\x03\x04": "ZIP archive",
    b"\x1f\x8b": "gzip data",
}

_ORIENTATION_TAG = 0x0112
#: EXIF orientation -> the transpose that turns the stored pixels upright (EXIF 2.3, tag 274).
_UPRIGHT_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,  # PIL rotates counter-clockwise: 270 CCW = 90 CW
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_WHITE = (255, 255, 255)


@dataclass(eq=False)
class DecodedImage:
    image: Image.Image  # RGB, upright
    width: int
    height: int
    orientation: int
    format: str | None


def decode_image(data: bytes, *, max_pixels: int) -> DecodedImage:
    """Decode ``data`` into an upright RGB image; raises :class:`ImageLoadError`."""
    if not data:
        raise ImageLoadError("empty image: the file has 0 bytes", "decode")
    foreign = sniff_non_raster(data)
    if foreign:
        raise ImageLoadError(f"unsupported image format: {foreign} is not a raster image", "unsupported")
    with _open(data) as im:
        fmt = im.format
        _check_pixels(im.size, max_pixels, fmt)
        im.seek(0)  # animated/multi-frame images: the first frame
        _load(im, fmt)
        orientation = read_orientation(im)
        rgb = to_rgb(im)
    upright = apply_orientation(rgb, orientation)
    expected = upright_size(rgb.width, rgb.height, orientation)
    if upright.size != expected:  # would mean the transpose table and egm.geometry disagree
        raise ImageLoadError(f"internal error: upright size {upright.size} != {expected}", "decode")
    return DecodedImage(upright, upright.width, upright.height, orientation, fmt)


# --- steps ----------------------------------------------------------------------

def sniff_non_raster(data: bytes) -> str | None:
    """Name of a known non-raster format (SVG, HTML, PDF, ...) when ``data`` looks like one."""
    for magic, name in _FOREIGN_MAGIC.items():
        if data.startswith(magic):
            return name
    head = data[:2048].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<"):
        if b"<svg" in head:
            return "SVG"
        if b"<html" in head or head.startswith(b"<!doctype html"):
            return "HTML"
        return "XML"
    if head[:1] in (b"{", b"["):
        return "JSON"
    return None


def _open(data: bytes) -> Image.Image:
    # Pillow's own bomb check runs inside open(): a warning between Image.MAX_IMAGE_PIXELS and
    # twice that (an exception where warnings are errors), an error above. Both mean too large;
    # below Pillow's limit our own cap (_check_pixels) decides.
    try:
        return Image.open(io.BytesIO(data), formats=RASTER_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"image too large (decompression-bomb guard): {exc}", "too_large") from None
    except UnidentifiedImageError:
        raster = sniff_raster(data)
        if raster:
            raise ImageLoadError(f"corrupt {raster} image: its header cannot be read", "decode") from None
        raise ImageLoadError(
            f"unsupported image format: not a recognised raster image (starts with {data[:8]!r})",
            "unsupported") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is a bad file, never a crash
        name = sniff_raster(data) or "image"
        raise ImageLoadError(f"corrupt {name} header: {type(exc).__name__}: {exc}", "decode") from None


def sniff_raster(data: bytes) -> str | None:
    """Raster format named by the magic bytes, whether or not the rest of the file is sound."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _RASTER_MAGIC.items() if data.startswith(magic)), None)


def _check_pixels(size: tuple[int, int], max_pixels: int, fmt: str | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"corrupt {fmt} image: declared size {width}x{height}", "decode")
    if width * height > max_pixels:
        raise ImageLoadError(
            f"image too large: {fmt} declares {width}x{height} = {width * height:,} pixels, "
            f"more than the limit of {max_pixels:,} (EGM_MAX_IMAGE_PIXELS)", "too_large")


def _load(im: Image.Image, fmt: str | None) -> None:
    try:
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(f"image too large (decompression-bomb guard): {exc}", "too_large") from None
    except MemoryError:
        raise ImageLoadError(f"image too large: out of memory decoding {fmt} data", "too_large") from None
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt data raises many types
        raise ImageLoadError(f"corrupt or truncated {fmt} image: {exc}", "decode") from None


def read_orientation(im: Image.Image) -> int:
    """EXIF orientation 1..8; 1 when absent, unreadable or out of range (a bad tag never fails the image)."""
    try:
        value = int(im.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - malformed EXIF blocks are common
        return 1
    return value if 1 <= value <= 8 else 1


def apply_orientation(im: Image.Image, orientation: int) -> Image.Image:
    method = _UPRIGHT_TRANSPOSE.get(orientation)
    return im.transpose(method) if method is not None else im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any decoded mode -> 8-bit RGB; transparency is composited on white."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES:
        return _scale_to_8bit(im.convert("I"), 65535)
    if mode == "I":
        low, high = im.getextrema()
        return _scale_to_8bit(im, 255 if high <= 255 else 65535 if high <= 65535 else high)
    if mode == "F":
        low, high = im.getextrema()
        return _scale_to_8bit(im, 1.0 if high <= 1.0 else 255 if high <= 255 else high)
    if mode in _ALPHA_MODES or "transparency" in im.info:
        return _on_white(im.convert("RGBA"))
    return im.convert("RGB")  # RGB (a copy), L, 1, P, CMYK, YCbCr, ...


def _scale_to_8bit(im: Image.Image, full_scale: float) -> Image.Image:
    """Integer/float grey (16-bit PNG/TIFF) -> 8-bit: Pillow's own convert clips at 255 instead of scaling."""
    scaled = im.point(lambda v: v * (255.0 / full_scale))
    return scaled.convert("L").convert("RGB")


def _on_white(rgba: Image.Image) -> Image.Image:
    canvas = Image.new("RGB", rgba.size, _WHITE)
    canvas.paste(rgba, (0, 0), rgba)
    return canvas

"""Test images as bytes: EXIF-oriented JPEGs, odd modes, malformed and hostile files.

Conventions: ``w, h`` are the STORED pixel size (what the file header says) unless a
function says "upright". Patterns use saturated colours far apart so JPEG noise never
confuses them: compare with :func:`close_to`.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib

from PIL import Image

RED = (230, 20, 20)
GREEN = (20, 200, 20)
BLUE = (20, 20, 230)
YELLOW = (240, 230, 20)
WHITE = (255, 255, 255)
#: top-left, top-right, bottom-left, bottom-right quadrant colours of :func:`quadrant_image`.
QUADRANT_COLORS = {"tl": RED, "tr": GREEN, "bl": BLUE, "br": YELLOW}

ZERO_BYTES = b""
ORIENTATION_TAG = 0x0112

#: Stored image -> upright image, per EXIF orientation, as PIL transposes. Used only to BUILD
#: files whose upright view is known (make_upright_jpeg); tests check loaders against the
#: EXIF specification's corner table, not against this.
_STORED_FROM_UPRIGHT = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # displayed rotated 90 CW, so store it rotated 90 CCW
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def close_to(pixel, color, tol: int = 40) -> bool:
    """Whether an RGB pixel is within ``tol`` of ``color`` on every channel (lossy formats)."""
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, color))


def quadrant_image(w: int, h: int, colors: dict[str, tuple[int, int, int]] | None = None) -> Image.Image:
    """An RGB image whose four quadrants have distinct colours (default :data:`QUADRANT_COLORS`)."""
    colors = colors or QUADRANT_COLORS
    im = Image.new("RGB", (w, h))
    hw, hh = w // 2, h // 2
    im.paste(colors["tl"], (0, 0, hw, hh))
    im.paste(colors["tr"], (hw, 0, w, hh))
    im.paste(colors["bl"], (0, hh, hw, h))
    im.paste(colors["br"], (hw, hh, w, h))
    return im


def quadrant_centers(w: int, h: int) -> dict[str, tuple[int, int]]:
    """Pixel at the middle of each quadrant of a ``w x h`` image."""
    return {"tl": (w // 4, h // 4), "tr": (3 * w // 4, h // 4), "bl": (w // 4, 3 * h // 4),
            "br": (3 * w // 4, 3 * h // 4)}


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    return exif.tobytes()


def encode(im: Image.Image, fmt: str, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **save_kwargs)
    return buf.getvalue()


def make_jpeg(w: int, h: int, orientation: int = 1, color: tuple[int, int, int] | None = None,
              quality: int = 95) -> bytes:
    """A ``w x h`` stored JPEG with EXIF orientation ``orientation`` (no tag when 1).
    ``color=None`` stores :func:`quadrant_image` (in the STORED frame); otherwise a solid colour."""
    im = quadrant_image(w, h) if color is None else Image.new("RGB", (w, h), color)
    kwargs = {"quality": quality}
    if orientation != 1:
        kwargs["exif"] = exif_bytes(orientation)
    return encode(im, "JPEG", **kwargs)


def make_upright_jpeg(w: int, h: int, orientation: int, quality: int = 95) -> bytes:
    """A JPEG whose UPRIGHT view (EXIF applied) is a ``w x h`` :func:`quadrant_image`."""
    upright = quadrant_image(w, h)
    method = _STORED_FROM_UPRIGHT[orientation]
    stored = upright.transpose(method) if method is not None else upright
    kwargs = {"quality": quality}
    if orientation != 1:
        kwargs["exif"] = exif_bytes(orientation)
    return encode(stored, "JPEG", **kwargs)


def make_png(w: int, h: int, mode: str = "RGB", color=RED, **save_kwargs) -> bytes:
    """A solid PNG in ``mode`` (RGB, RGBA, L, LA, P, I;16, ...); ``color`` must suit the mode."""
    return encode(Image.new(mode, (w, h), color), "PNG", **save_kwargs)


def make_image(w: int, h: int, fmt: str, mode: str = "RGB", color=RED, **save_kwargs) -> bytes:
    """A solid image in any format Pillow writes (WEBP, GIF, BMP, TIFF, ...)."""
    return encode(Image.new(mode, (w, h), color), fmt, **save_kwargs)


def make_noise_jpeg(w: int = 128, h: int = 128, seed: int = 0) -> bytes:
    """A JPEG with busy content (so its entropy-coded data is long enough to cut)."""
    im = Image.frombytes("RGB", (w, h), _pseudo_random_bytes(w * h * 3, seed))
    return encode(im, "JPEG", quality=90)


def make_truncated_jpeg(w: int = 128, h: int = 128, keep: float = 0.6) -> bytes:
    """A JPEG cut after ``keep`` of its bytes: the header is intact, the pixel data is not."""
    data = make_noise_jpeg(w, h)
    return data[: int(len(data) * keep)]


def make_truncated_png(w: int = 64, h: int = 64, keep: float = 0.6) -> bytes:
    im = Image.frombytes("RGB", (w, h), _pseudo_random_bytes(w * h * 3, 1))
    data = encode(im, "PNG")
    return data[: int(len(data) * keep)]


def make_bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares ``width x height`` RGB pixels (a decompression bomb)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def make_cmyk_jpeg(w: int = 32, h: int = 32, cmyk: tuple[int, int, int, int] = (0, 255, 255, 0)) -> bytes:
    """A CMYK JPEG; the default ink (no cyan, full magenta and yellow) is red."""
    return encode(Image.new("CMYK", (w, h), cmyk), "JPEG", quality=95)


def make_16bit_png(w: int = 16, h: int = 16, value: int = 0x8000) -> bytes:
    """A 16-bit greyscale PNG (mode I;16); ``value`` 0x8000 is mid grey (about 128 in 8 bits)."""
    return encode(Image.new("I;16", (w, h), value), "PNG")


def make_16bit_tiff(w: int = 16, h: int = 16, value: int = 0xC000) -> bytes:
    return encode(Image.new("I;16", (w, h), value), "TIFF")


def make_palette_alpha_png(w: int = 32, h: int = 16) -> bytes:
    """Palette PNG with transparency: left half fully transparent, right half opaque red."""
    im = Image.new("P", (w, h), 0)
    im.putpalette([0, 0, 0, *RED] + [0, 0, 0] * 254)
    im.paste(1, (w // 2, 0, w, h))
    return encode(im, "PNG", transparency=0)


def make_la_png(w: int = 16, h: int = 16, grey: int = 0, alpha: int = 0) -> bytes:
    """Grey + alpha PNG; alpha 0 must come out white, alpha 255 the grey value."""
    return encode(Image.new("LA", (w, h), (grey, alpha)), "PNG")


def make_rgba_png(w: int = 16, h: int = 16, color=(0, 0, 255), alpha: int = 128) -> bytes:
    return encode(Image.new("RGBA", (w, h), (*color, alpha)), "PNG")


def make_animated_gif(w: int = 16, h: int = 16, colors=(RED, BLUE, GREEN)) -> bytes:
    """An animated GIF, one solid frame per colour; loaders should keep the first."""
    frames = [Image.new("RGB", (w, h), c).convert("P") for c in colors]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def make_svg(w: int = 16, h: int = 16) -> bytes:
    return (f'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">'
            f'<rect width="{w}" height="{h}" fill="red"/></svg>').encode()


def make_html() -> bytes:
    """What a login page or error page returned with status 200 looks like."""
    return b"<!DOCTYPE html><html><head><title>Login</title></head><body>Sign in</body></html>"


def to_data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _pseudo_random_bytes(n: int, seed: int) -> bytes:
    """Deterministic noise without numpy (a 32-bit LCG)."""
    out = bytearray(n)
    state = seed * 2654435761 + 12345
    for i in range(n):
        state = (state * 1103515245 + 12345) & 0xFFFFFFFF
        out[i] = state >> 24
    return bytes(out)

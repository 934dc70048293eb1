"""Helpers for the bulk-run tests: distinct images, a corrupt one, running the CLI in-process."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

from PIL import Image

CORRUPT_JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 64  # a JPEG header and nothing decodable


def image_bytes(i: int, seed: int = 0, size: tuple[int, int] = (40, 30)) -> bytes:
    """A small PNG whose content differs for every (i, seed): distinct cache keys."""
    n = i + seed * 10_000
    im = Image.new("RGB", size, ((n * 37) % 256, (n * 91) % 256, (n // 256 * 53 + 11) % 256))
    im.putpixel((n % size[0], (n // size[0]) % size[1]), (255 - (n % 256), 0, 128))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:04d}.png"
        path.write_bytes(image_bytes(i, seed))
        paths.append(path)
    return paths


def run_cli(*argv: str) -> tuple[int, dict | str]:
    """``egm-assist argv`` in this process; stdout parsed as JSON when it is JSON."""
    from egm.cli.main import main

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(argv))
    text = out.getvalue()
    try:
        return code, json.loads(text)
    except ValueError:
        return code, text

"""Photo-like JPEGs for end-to-end benchmarks: what a camera folder costs to read and decode.

Decoding cost follows the file, not the scene: a flat test pattern compresses to a few
kilobytes and decodes several times faster than a photo. These images have what makes real
photos expensive: smooth lighting (sky and ground gradients), objects with edges (boxes and
ellipses of varied colour, some soft), fine texture and sensor noise, and 4:2:0 JPEG at
quality 90, which gives 1920x1080 files of roughly 0.4-0.9 MB like a phone's. Every tenth
image carries an EXIF orientation (6: shot in portrait) so the loader's transpose runs too.

    python3 bench/photos.py OUT_DIR -n 2000 [--size 1920x1080] [--jobs 16]

Deterministic: image i of a given size is the same on every machine.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

QUALITY = 90
ORIENTATION_TAG = 0x0112


def photo(index: int, width: int, height: int) -> Image.Image:
    """Image ``index``: a horizon scene with objects, texture and noise."""
    rng = np.random.default_rng(index)
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    horizon = rng.uniform(0.35, 0.6)
    sky_top, sky_low = rng.uniform(90, 200, 3), rng.uniform(160, 250, 3)
    ground_near, ground_far = rng.uniform(20, 110, 3), rng.uniform(60, 160, 3)
    t_sky = np.clip(y / horizon, 0, 1)
    t_ground = np.clip((y - horizon) / (1 - horizon), 0, 1)
    img = np.where(y < horizon, sky_top + (sky_low - sky_top) * t_sky,
                   ground_far + (ground_near - ground_far) * t_ground)
    img = np.broadcast_to(img, (height, width, 3)).astype(np.float32).copy()
    # low-frequency lighting: a coarse random field, upsampled smoothly
    coarse = rng.normal(0, 18, (6, 10, 3)).astype(np.float32)
    light = np.asarray(Image.fromarray(np.uint8(np.clip(coarse + 128, 0, 255))).resize(
        (width, height), Image.Resampling.BICUBIC), dtype=np.float32) - 128
    img += light
    # objects standing on the ground: boxes and ellipses, some darker at the bottom (shadows)
    yy, xx = np.ogrid[:height, :width]
    for _ in range(int(rng.integers(6, 18))):
        cx, w = rng.uniform(0, width), rng.uniform(0.02, 0.25) * width
        base = rng.uniform(horizon * height, height)
        h = rng.uniform(0.05, 0.45) * height
        color = rng.uniform(0, 255, 3).astype(np.float32)
        x0, x1 = int(max(cx - w / 2, 0)), int(min(cx + w / 2, width))
        y0, y1 = int(max(base - h, 0)), int(min(base, height))
        if x1 <= x0 or y1 <= y0:
            continue
        if rng.random() < 0.5:
            region = img[y0:y1, x0:x1]
            shade = np.linspace(1.0, 0.7, y1 - y0, dtype=np.float32)[:, None, None]
            region[:] = color * shade
        else:
            ry, rx = (y1 - y0) / 2, (x1 - x0) / 2
            inside = ((yy[y0:y1] - (y0 + ry)) / ry) ** 2 + ((xx[:, x0:x1] - (x0 + rx)) / rx) ** 2 <= 1
            img[y0:y1, x0:x1][inside] = color
    # texture (grass, asphalt, foliage) and sensor noise: what makes JPEGs big and slow to decode.
    # Both come from one fixed noise field per size, shifted per image (drawing 6 M normals per
    # image would triple the time this takes).
    noise = _noise(height, width)
    dy, dx = int(rng.integers(0, height)), int(rng.integers(0, width))
    shifted = np.roll(noise, (dy, dx), axis=(0, 1))
    g = int(horizon * height)
    img[g:] += shifted[g:, :, :1] * np.float32(rng.uniform(0.15, 0.4))  # coarse luminance texture
    img += shifted * np.float32(rng.uniform(0.1, 0.2))  # colour noise everywhere
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


_NOISE: dict[tuple[int, int], np.ndarray] = {}


def _noise(height: int, width: int) -> np.ndarray:
    """Gaussian noise (sigma ~30) of the image's size, the same in every process."""
    key = (height, width)
    if key not in _NOISE:
        _NOISE[key] = np.random.default_rng(12345).normal(0, 30, (height, width, 3)).astype(np.float32)
    return _NOISE[key]


def jpeg_bytes(index: int, width: int, height: int) -> bytes:
    im = photo(index, width, height)
    exif = Image.Exif()
    exif[0x010F] = "egm-bench"  # Make
    if index % 10 == 9:
        # stored sideways, shown upright by the orientation tag, as phones do
        im = im.transpose(Image.Transpose.ROTATE_90)
        exif[ORIENTATION_TAG] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=QUALITY, subsampling="4:2:0", exif=exif.tobytes())
    return buf.getvalue()


def _write(args: tuple[int, int, int, str]) -> int:
    index, width, height, out = args
    path = Path(out) / f"photo-{index:06d}.jpg"
    if not path.exists():
        data = jpeg_bytes(index, width, height)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path.stat().st_size


def make_photos(out: Path, n: int, width: int = 1920, height: int = 1080, jobs: int | None = None) -> list[Path]:
    """Write ``photo-000000.jpg`` ... into ``out`` (kept if already there); returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    jobs = jobs or os.cpu_count() or 1
    work = [(i, width, height, str(out)) for i in range(n)]
    if jobs == 1 or n < 4:
        for w in work:
            _write(w)
    else:
        # spawn, not fork: the caller may be multi-threaded with CUDA up (gpu_e2e builds the model meanwhile)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_write, work, chunksize=8))
    return [out / f"photo-{i:06d}.jpg" for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("--size", default="1920x1080", help="WIDTHxHEIGHT (upright)")
    ap.add_argument("--jobs", type=int, default=None, help="processes (default: all cores)")
    args = ap.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    t0 = time.perf_counter()
    paths = make_photos(args.out, args.n, width, height, args.jobs)
    total = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} photos {width}x{height} in {args.out}: {total / len(paths) / 1e6:.2f} MB each, "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

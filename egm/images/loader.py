"""Image loading: a task's image reference -> an upright RGB image (workers and export).

``load_image`` reads the bytes (:mod:`egm.images.sources`: Label Studio media,
guarded http(s), local files, data: URLs) and decodes them
(:mod:`egm.images.decode`: size cap before decoding, full decode, first frame,
any mode to RGB, EXIF orientation applied). Every failure is an
:class:`ImageLoadError` with a ``kind``; the caller fails only that task.
``fetch_many`` loads a batch concurrently and never raises.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

from PIL import Image

from egm.images.decode import decode_image
from egm.images.errors import IMAGE_ERROR_KINDS, ImageErrorKind, ImageLoadError
from egm.images.sources import MediaDownloader, read_source
from egm.images.url_guard import UrlGuard
from egm.redaction import redact_url

__all__ = [
    "IMAGE_ERROR_KINDS", "ImageErrorKind", "ImageLoadError", "LoadedImage", "MediaDownloader",
    "fetch_many", "load_image",
]

DEFAULT_FETCH_THREADS = 4


@dataclass(eq=False)
class LoadedImage:
    image: Image.Image  # RGB, EXIF orientation applied
    width: int  # upright size: the size Label Studio shows and EGM's 0..1000 grid refers to
    height: int
    orientation: int  # the EXIF orientation that was applied (1 = none)
    sha256: str  # of the original bytes (cache key; identical files share results)
    source: str
    format: str | None = None  # JPEG, PNG, ... as Pillow names it


def load_image(source: str, *, settings, ls_client: MediaDownloader | None = None,
               guard: UrlGuard | None = None) -> LoadedImage:
    """Load one image; raises :class:`ImageLoadError` and nothing else."""
    if not isinstance(source, str):
        raise ImageLoadError(f"image reference must be a string, got {type(source).__name__}", "fetch")
    shown = redact_url(source)
    try:
        guard = guard or UrlGuard.from_settings(settings)
        data = read_source(source, settings=settings, ls_client=ls_client, guard=guard)
    except ImageLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug or odd input must fail this image, not the batch
        raise ImageLoadError(f"cannot read image {shown}: {type(exc).__name__}: {exc}", "fetch") from None
    try:
        decoded = decode_image(data, max_pixels=settings.max_image_pixels)
    except ImageLoadError as exc:
        raise ImageLoadError(f"{exc.message} [{shown}]", exc.kind) from None
    except Exception as exc:  # noqa: BLE001
        raise ImageLoadError(f"cannot decode image {shown}: {type(exc).__name__}: {exc}", "decode") from None
    return LoadedImage(
        image=decoded.image, width=decoded.width, height=decoded.height, orientation=decoded.orientation,
        sha256=hashlib.sha256(data).hexdigest(), source=source, format=decoded.format,
    )


def fetch_many(sources: Sequence[str], *, settings, ls_client: MediaDownloader | None = None,
               guard: UrlGuard | None = None,
               max_workers: int = DEFAULT_FETCH_THREADS) -> list[LoadedImage | ImageLoadError]:
    """Load a batch concurrently (download and decode overlap across images); one entry per source,
    in order, each a :class:`LoadedImage` or the :class:`ImageLoadError` of that image. Never raises."""
    if not sources:
        return []
    guard = guard or UrlGuard.from_settings(settings)

    def one(source: str) -> LoadedImage | ImageLoadError:
        try:
            return load_image(source, settings=settings, ls_client=ls_client, guard=guard)
        except ImageLoadError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - load_image should not get here; belt and braces
            return ImageLoadError(f"cannot load image: {type(exc).__name__}: {exc}", "fetch")

    workers = max(1, min(max_workers, len(sources)))
    if workers == 1:
        return [one(s) for s in sources]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="egm-images") as pool:
        return list(pool.map(one, sources))

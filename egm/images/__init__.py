"""Torch-free image loading: a task's image reference -> an upright RGB image.

Used by the workers (before the engine) and by the export (image files beside the data), so it
lives in the core. ``loader`` is the entry point; ``sources`` reads bytes (Label Studio media,
guarded http(s), local files, data: URLs), ``url_guard`` vets URLs, ``decode`` decodes with a size
cap and EXIF orientation, ``errors`` holds :class:`ImageLoadError` and its kinds.
"""

from egm.images.loader import (IMAGE_ERROR_KINDS, ImageErrorKind, ImageLoadError, LoadedImage, MediaDownloader,
                               fetch_many, load_image)

__all__ = [
    "IMAGE_ERROR_KINDS", "ImageErrorKind", "ImageLoadError", "LoadedImage", "MediaDownloader",
    "fetch_many", "load_image",
]

"""The one error image loading raises; the caller fails only the task whose image it was."""

from __future__ import annotations

from typing import Literal, get_args

ImageErrorKind = Literal["fetch", "blocked", "too_large", "decode", "unsupported"]
IMAGE_ERROR_KINDS: tuple[str, ...] = get_args(ImageErrorKind)


class ImageLoadError(Exception):
    """An image could not be loaded.

    ``kind``: ``fetch`` (download/read failed), ``blocked`` (URL or path refused by policy),
    ``too_large`` (bytes or pixels over the limits), ``decode`` (empty, corrupt or truncated
    data), ``unsupported`` (not a raster image format we decode).
    """

    def __init__(self, message: str, kind: ImageErrorKind) -> None:
        if kind not in IMAGE_ERROR_KINDS:
            raise ValueError(f"unknown image error kind {kind!r}")
        # Both in args so the error pickles (results cross process boundaries).
        super().__init__(message, kind)
        self.message = message
        self.kind: ImageErrorKind = kind

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"ImageLoadError({self.message!r}, kind={self.kind!r})"

"""Put each task's image into the dataset folder and learn its upright size.

Images are fetched and decoded by the workers' loader (:func:`egm.images.load_image`:
Label Studio media with the token, guarded URLs, local files, EXIF orientation applied),
so the export sees exactly the image EGM saw and Label Studio showed.

What lands in ``<out>/images/``:

* an image without EXIF rotation: its original bytes (copied, or hard/soft-linked with
  ``mode="link"`` when it is a local file);
* an EXIF-rotated image: the *upright* pixels, re-encoded without the EXIF tag
  (JPEG quality 95, else PNG). Boxes are in upright coordinates, and trainers differ in
  whether they apply EXIF; writing upright pixels makes every trainer agree.

Files are named ``<sha256[:16]>.<ext>`` so a picture used by several tasks is stored once.
A failure is reported for that task (``ImageEntry.error``) and never raised.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from egm.images.sources import confined_path, file_url_path
from egm.images import ImageLoadError, LoadedImage, load_image

ImageMode = Literal["copy", "link"]
IMAGES_FOLDER = "images"
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


@dataclass
class ImageEntry:
    source: str
    #: path relative to the dataset folder (``images/<name>``), ``None`` when the image failed.
    rel_path: str | None = None
    #: upright size in pixels (EXIF applied): the frame of the 0..1000 grid.
    width: int | None = None
    height: int | None = None
    orientation: int = 1
    sha256: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.rel_path is not None and self.error is None


class _RecordingDownloader:
    """Passes Label Studio downloads through and keeps the bytes, so unrotated images are copied verbatim."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.data: bytes | None = None

    def download(self, url: str, max_bytes: int | None = None) -> bytes:
        self.data = self.inner.download(url, max_bytes)
        return self.data


class ImageCollector:
    def __init__(self, out_dir: Path, settings, ls_client=None, mode: ImageMode = "copy") -> None:
        self.out_dir = Path(out_dir)
        self.folder = self.out_dir / IMAGES_FOLDER
        self.settings = settings
        self.ls_client = ls_client
        self.mode = mode
        self._by_source: dict[str, ImageEntry] = {}
        self._by_sha: dict[str, str] = {}

    def collect(self, source: str) -> ImageEntry:
        """Fetch ``source`` once (cached per reference) and place it in the dataset."""
        if source in self._by_source:
            return self._by_source[source]
        entry = self._collect(source)
        self._by_source[source] = entry
        return entry

    def _collect(self, source: str) -> ImageEntry:
        recorder = _RecordingDownloader(self.ls_client) if self.ls_client is not None else None
        try:
            loaded = load_image(source, settings=self.settings, ls_client=recorder)
        except ImageLoadError as exc:
            return ImageEntry(source=source, error=str(exc))
        entry = ImageEntry(source=source, width=loaded.width, height=loaded.height,
                           orientation=loaded.orientation, sha256=loaded.sha256)
        try:
            entry.rel_path = self._place(loaded, recorder)
        except OSError as exc:
            entry.error = f"cannot write image for {source}: {exc.strerror or exc}"
        return entry

    def _place(self, loaded: LoadedImage, recorder: _RecordingDownloader | None) -> str:
        existing = self._by_sha.get(loaded.sha256)
        if existing:
            return existing
        self.folder.mkdir(parents=True, exist_ok=True)
        local = self._local_path(loaded.source)
        raw = recorder.data if recorder is not None and recorder.data is not None else None
        if raw is not None and hashlib.sha256(raw).hexdigest() != loaded.sha256:
            raw = None
        if loaded.orientation == 1 and (local or raw is not None):
            name = f"{loaded.sha256[:16]}.{_EXTENSIONS.get(loaded.format or '', 'img')}"
            target = self.folder / name
            if not target.exists():
                if local:
                    self._copy_or_link(Path(local), target)
                else:
                    _write_atomic(target, raw)
        else:
            name = self._write_upright(loaded)
        rel = f"{IMAGES_FOLDER}/{name}"
        self._by_sha[loaded.sha256] = rel
        return rel

    def _write_upright(self, loaded: LoadedImage) -> str:
        jpeg = (loaded.format or "").upper() == "JPEG"
        name = f"{loaded.sha256[:16]}.{'jpg' if jpeg else 'png'}"
        target = self.folder / name
        if not target.exists():
            tmp = target.with_name(target.name + ".tmp")
            if jpeg:
                loaded.image.save(tmp, "JPEG", quality=95)
            else:
                loaded.image.save(tmp, "PNG")
            os.replace(tmp, target)
        return name

    def _local_path(self, source: str) -> str | None:
        """The file a plain local path / ``file://`` reference names (under EGM_LOCAL_FILES_ROOT)."""
        root = self.settings.local_files_root
        if not root:
            return None
        scheme = urlsplit(source).scheme.lower()
        try:
            if scheme == "file":
                path = confined_path(file_url_path(source), root)
            elif scheme == "" and not source.startswith("/data/"):
                path = confined_path(source, root)
            else:
                return None
        except ImageLoadError:
            return None
        return path if os.path.isfile(path) else None

    def _copy_or_link(self, source: Path, target: Path) -> None:
        if self.mode == "link":
            try:
                os.link(source, target)
                return
            except OSError:
                pass
            try:
                os.symlink(source.resolve(), target)
                return
            except OSError:
                pass
        shutil.copyfile(source, target)


def _write_atomic(target: Path, data: bytes) -> None:
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)

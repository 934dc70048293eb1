"""Image reference -> raw bytes, for every kind of reference a task may carry.

* Label Studio media (``/data/upload/...``, ``/data/local-files/?d=...``, relative or on
  Label Studio's origin): the Label Studio client (it carries the token). Local files are
  read from disk when ``EGM_LOCAL_FILES_ROOT`` holds them.
* Other http(s) URLs: httpx through :class:`~egm.images.url_guard.UrlGuard`, connecting to the
  vetted address only, redirects followed by hand and vetted hop by hop, byte-capped.
* Local paths and ``file://`` URLs (confined to ``EGM_LOCAL_FILES_ROOT`` when it is set).
* ``data:`` URLs.

Every failure is an :class:`ImageLoadError`; messages show URLs redacted.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import time
from pathlib import PurePosixPath
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qs, unquote, unquote_to_bytes, urljoin, urlsplit

import httpx

from egm.images.errors import ImageLoadError
from egm.images.url_guard import BlockedUrlError, UrlGuard, UrlResolveError, VettedUrl
from egm.redaction import redact_secrets, redact_url

#: Root-relative paths that are Label Studio media, not local files.
LABEL_STUDIO_PREFIXES = ("/data/upload/", "/data/local-files/", "/data/local-files?")
MAX_REDIRECTS = 5
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024
_HEADERS = {"Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity", "User-Agent": "egm-assist"}


@runtime_checkable
class MediaDownloader(Protocol):
    """What image loading needs from the Label Studio client (``egm.labelstudio.LabelStudioClient``)."""

    def download(self, url: str, max_bytes: int) -> bytes: ...


def read_source(source: str, *, settings, ls_client: MediaDownloader | None, guard: UrlGuard) -> bytes:
    """The raw bytes ``source`` refers to."""
    ref = source.strip()
    if not ref:
        raise ImageLoadError("empty image reference", "fetch")
    max_bytes = settings.max_image_bytes
    if ref[:5].lower() == "data:":
        return read_data_url(ref, max_bytes)
    if ref.startswith(LABEL_STUDIO_PREFIXES):
        return read_label_studio(settings.label_studio_url.rstrip("/") + ref, settings=settings,
                                 ls_client=ls_client)
    scheme = urlsplit(ref).scheme.lower()
    if scheme in ("http", "https"):
        if guard.is_label_studio_url(ref):
            return read_label_studio(ref, settings=settings, ls_client=ls_client)
        return http_get_bytes(ref, guard=guard, timeout_s=settings.image_timeout_s, max_bytes=max_bytes)
    if scheme == "file":
        return read_local_file(file_url_path(ref), root=settings.local_files_root, max_bytes=max_bytes)
    if scheme == "":
        return read_local_file(ref, root=settings.local_files_root, max_bytes=max_bytes)
    raise ImageLoadError(f"refused {redact_url(ref)}: unsupported URL scheme '{scheme}'", "blocked")


# --- Label Studio -----------------------------------------------------------------

def read_label_studio(url: str, *, settings, ls_client: MediaDownloader | None) -> bytes:
    """Label Studio media; local-files come from disk when they are under EGM_LOCAL_FILES_ROOT."""
    local = _local_files_path(url)
    if local is not None and settings.local_files_root:
        path = confined_path(local.lstrip("/"), settings.local_files_root)
        if os.path.isfile(path):
            return read_local_file(path, root=settings.local_files_root, max_bytes=settings.max_image_bytes)
    if ls_client is None:
        raise ImageLoadError(
            f"cannot download {redact_url(url)}: Label Studio media needs a Label Studio client "
            "(set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY)", "fetch")
    try:
        data = ls_client.download(url, settings.max_image_bytes)
    except ImageLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the client raises fails this image only
        detail = redact_secrets(f"{type(exc).__name__}: {exc}", settings.secret_values())
        # The client reports its own byte cap in words ("over the N-byte limit"); anything else is a fetch error.
        kind = "too_large" if "byte limit" in str(exc) else "fetch"
        raise ImageLoadError(f"Label Studio download of {redact_url(url)} failed: {detail}", kind) from None
    if not isinstance(data, (bytes, bytearray)):
        raise ImageLoadError(f"Label Studio download of {redact_url(url)} returned no bytes", "fetch")
    if len(data) > settings.max_image_bytes:
        raise ImageLoadError(_too_many_bytes(url, settings.max_image_bytes), "too_large")
    return bytes(data)


def _local_files_path(url: str) -> str | None:
    """The ``d`` parameter of a ``/data/local-files/?d=...`` URL."""
    parts = urlsplit(url)
    if not parts.path.rstrip("/").endswith("/data/local-files"):
        return None
    values = parse_qs(parts.query).get("d")
    return values[0] if values else None


# --- local files --------------------------------------------------------------------

def file_url_path(url: str) -> str:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageLoadError(f"refused {redact_url(url)}: file:// URLs on another host are not supported", "blocked")
    return unquote(parts.path)


def confined_path(path: str, root: str) -> str:
    """``path`` (relative to ``root`` or absolute) resolved; refused when it leaves ``root``, symlinks included."""
    _refuse_traversal(path)
    root_real = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root_real, path))
    if os.path.commonpath([real, root_real]) != root_real:
        raise ImageLoadError(f"refused local path {path!r}: outside EGM_LOCAL_FILES_ROOT", "blocked")
    return real


def _refuse_traversal(path: str) -> None:
    if "\x00" in path:
        raise ImageLoadError("refused local path: it contains a NUL byte", "blocked")
    if ".." in PurePosixPath(path.replace("\\", "/")).parts:
        raise ImageLoadError(f"refused local path {path!r}: '..' path traversal", "blocked")


def read_local_file(path: str, *, root: str | None, max_bytes: int) -> bytes:
    if not root:
        # Task data comes from whoever can create tasks: never let it read arbitrary files.
        raise ImageLoadError(f"local image paths are disabled ({path}): set EGM_LOCAL_FILES_ROOT to the folder "
                             "that holds your images", "blocked")
    real = confined_path(path, root)
    try:
        with open(real, "rb") as handle:
            if os.fstat(handle.fileno()).st_size > max_bytes:
                raise ImageLoadError(_too_many_bytes(path, max_bytes), "too_large")
            data = handle.read(max_bytes + 1)
    except FileNotFoundError:
        raise ImageLoadError(f"image file not found: {path}", "fetch") from None
    except IsADirectoryError:
        raise ImageLoadError(f"image path is a directory: {path}", "fetch") from None
    except OSError as exc:
        raise ImageLoadError(f"cannot read image file {path}: {exc.strerror or exc}", "fetch") from None
    if len(data) > max_bytes:  # grew while we read it
        raise ImageLoadError(_too_many_bytes(path, max_bytes), "too_large")
    return data


# --- data: URLs -----------------------------------------------------------------------

def read_data_url(url: str, max_bytes: int) -> bytes:
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise ImageLoadError("malformed data: URL (no comma before the data)", "decode")
    if not header.lower().endswith(";base64"):
        data = unquote_to_bytes(payload)
    else:
        payload = re.sub(r"\s+", "", unquote(payload) if "%" in payload else payload)
        if len(payload) * 3 // 4 > max_bytes + 2:  # refuse before decoding
            raise ImageLoadError(_too_many_bytes("data: URL", max_bytes), "too_large")
        payload += "=" * (-len(payload) % 4)
        altchars = b"-_" if ("-" in payload or "_" in payload) else None
        try:
            data = base64.b64decode(payload, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            raise ImageLoadError("malformed data: URL (invalid base64)", "decode") from None
    if len(data) > max_bytes:
        raise ImageLoadError(_too_many_bytes("data: URL", max_bytes), "too_large")
    return data


# --- http(s) through the guard --------------------------------------------------------

def http_get_bytes(url: str, *, guard: UrlGuard, timeout_s: float, max_bytes: int,
                   max_redirects: int = MAX_REDIRECTS) -> bytes:
    """GET ``url`` with every hop vetted by ``guard`` and pinned to the vetted address."""
    deadline = time.monotonic() + timeout_s
    # trust_env=False: an environment proxy would make the connection go somewhere the guard never saw.
    with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False, headers=_HEADERS) as client:
        current = url
        for _ in range(max_redirects + 1):
            vetted = _vet(guard, current)
            outcome = _get_once(client, vetted, deadline, timeout_s, max_bytes)
            if isinstance(outcome, bytes):
                return outcome
            current = outcome  # redirect target, vetted on the next turn
    raise ImageLoadError(f"too many redirects (more than {max_redirects}) fetching {redact_url(url)}", "fetch")


def _vet(guard: UrlGuard, url: str) -> VettedUrl:
    try:
        return guard.vet(url)
    except UrlResolveError as exc:
        raise ImageLoadError(str(exc), "fetch") from None
    except BlockedUrlError as exc:
        raise ImageLoadError(str(exc), "blocked") from None


def _get_once(client: httpx.Client, vetted: VettedUrl, deadline: float, timeout_s: float,
              max_bytes: int) -> bytes | str:
    """The body, or the absolute URL a redirect points to. Tries each vetted address until one connects."""
    shown = redact_url(vetted.url)
    failure = ""
    for address in vetted.addresses:
        pinned = vetted.pinned(address)
        try:
            with client.stream("GET", pinned.url, headers=pinned.headers, extensions=pinned.extensions) as response:
                return _read_response(response, vetted, deadline, timeout_s, max_bytes)
        except httpx.ConnectError as exc:
            failure = str(exc) or type(exc).__name__
        except httpx.TimeoutException:
            raise ImageLoadError(f"timed out after {timeout_s:g} s fetching {shown}", "fetch") from None
        except httpx.HTTPError as exc:
            raise ImageLoadError(f"fetching {shown} failed: {type(exc).__name__}: {exc}", "fetch") from None
    raise ImageLoadError(f"could not connect to {shown}: {failure}", "fetch")


def _read_response(response: httpx.Response, vetted: VettedUrl, deadline: float, timeout_s: float,
                   max_bytes: int) -> bytes | str:
    shown = redact_url(vetted.url)
    status = response.status_code
    if status in _REDIRECT_STATUSES:
        location = response.headers.get("location")
        if not location:
            raise ImageLoadError(f"HTTP {status} redirect without a Location header from {shown}", "fetch")
        return urljoin(vetted.url, location.strip())
    if status >= 400:
        raise ImageLoadError(f"HTTP {status} {response.reason_phrase} fetching {shown}".replace("  ", " "), "fetch")
    if not 200 <= status < 300:
        raise ImageLoadError(f"unexpected HTTP {status} fetching {shown}", "fetch")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageLoadError(_too_many_bytes(vetted.url, max_bytes, f" (Content-Length {int(declared):,})"),
                             "too_large")
    body = bytearray()
    for chunk in response.iter_bytes(_CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise ImageLoadError(_too_many_bytes(vetted.url, max_bytes), "too_large")
        if time.monotonic() > deadline:  # a server that trickles bytes never trips the read timeout
            raise ImageLoadError(f"timed out after {timeout_s:g} s fetching {shown}", "fetch")
    return bytes(body)


def _too_many_bytes(where: str, max_bytes: int, detail: str = "") -> str:
    return f"image too large: {redact_url(where)} is over {max_bytes:,} bytes{detail} (EGM_MAX_IMAGE_BYTES)"

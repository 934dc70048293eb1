"""Content fingerprint of a local checkpoint folder: it changes when any weight changes.

File names, sizes and config are not enough: a checkpoint fine-tuned in place has the same
files, sizes and config as its parent. So every file that decides the model's answers
(weights, configs, tokenizer, chat template, custom code) is hashed in full, in threads and in
segments (one 5 GB shard is hashed on all cores), once. The per-file hashes are cached next to
the checkpoint (``.egm-fingerprint.json``) or, when that folder is read-only, under
``EGM_STATE_DIR``; a cached hash is trusted only while the file's size, mtime, inode AND a
cheap sampled digest (the safetensors header plus a few KiB from every tensor; a spread of
windows for other files) are unchanged, so a stale cache entry (mtime kept by ``cp -p`` or a
container layer) is never believed. bench/fingerprint.py measures both paths on 9 GB.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_FILE = ".egm-fingerprint.json"
CACHE_FORMAT = 1
#: files that decide the answers; READMEs, licences and hidden files do not.
HASHED_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".jinja", ".model", ".txt",
                             ".tiktoken", ".py", ".msgpack", ".h5"})
SEGMENT_BYTES = 256 * 1024 * 1024
READ_BYTES = 8 * 1024 * 1024
#: sampled digest: bytes taken at the start, middle and end of each tensor / window.
SAMPLE_BYTES = 1024
SMALL_FILE_BYTES = 1024 * 1024
OTHER_FILE_WINDOWS = 64


class FingerprintError(RuntimeError):
    """The checkpoint folder cannot be read."""


@dataclass
class Fingerprint:
    #: sha256 over every hashed file's relative name and content hash.
    digest: str
    files: dict[str, str] = field(default_factory=dict)
    #: bytes read to hash files in full this time (0 when every hash came from the cache).
    hashed_bytes: int = 0
    cached_files: int = 0
    seconds: float = 0.0
    cache_path: str | None = None


def model_files(folder: Path) -> list[Path]:
    """The files of a checkpoint that decide its answers, sorted (subfolders included, hidden ones not)."""
    out = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in HASHED_SUFFIXES and path.is_file():
            out.append(path)
    return sorted(out, key=lambda p: p.relative_to(folder).as_posix())


# --------------------------------------------------------------------------- sampled digest


def _read_at(f, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


def _windows(start: int, end: int, n: int = SAMPLE_BYTES) -> list[tuple[int, int]]:
    """Start, middle and end of ``[start, end)`` (fewer when it is short)."""
    size = end - start
    if size <= 3 * n:
        return [(start, size)]
    return [(start, n), (start + size // 2 - n // 2, n), (end - n, n)]


def _safetensors_windows(f, size: int) -> list[tuple[int, int]] | None:
    """The header and a few KiB of every tensor, or None when this is not a readable safetensors file."""
    if size < 8:
        return None
    (header_len,) = struct.unpack("<Q", _read_at(f, 0, 8))
    if header_len <= 0 or 8 + header_len > size or header_len > 100 * 1024 * 1024:
        return None
    try:
        header = json.loads(_read_at(f, 8, header_len))
    except ValueError:
        return None
    base = 8 + header_len
    windows = [(0, base)]
    for name in sorted(k for k in header if k != "__metadata__"):
        offsets = header[name].get("data_offsets") if isinstance(header[name], dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            return None
        begin, end = (base + int(o) for o in offsets)
        if end > begin:
            windows += _windows(begin, end)
    windows.append((max(base, size - SAMPLE_BYTES), min(SAMPLE_BYTES, size - base)))
    return windows


def sampled_digest(path: Path, size: int) -> str:
    """A cheap digest that changes when the content changes in any tensor (or, for other
    files, anywhere in a spread of windows). Small files are read whole."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= SMALL_FILE_BYTES:
            h.update(f.read())
            return h.hexdigest()
        windows = _safetensors_windows(f, size) if path.suffix == ".safetensors" else None
        if windows is None:
            step = size // OTHER_FILE_WINDOWS
            windows = [(i * step, SAMPLE_BYTES) for i in range(OTHER_FILE_WINDOWS)] + [(size - SAMPLE_BYTES,
                                                                                        SAMPLE_BYTES)]
        for offset, n in windows:
            h.update(_read_at(f, offset, n))
    return h.hexdigest()


# --------------------------------------------------------------------------- full hashes


def _hash_segment(path: Path, offset: int, length: int) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        left = length
        while left > 0:
            chunk = f.read(min(READ_BYTES, left))
            if not chunk:
                raise FingerprintError(f"{path} shrank while it was being hashed")
            h.update(chunk)
            left -= len(chunk)
    return h.digest()


def _full_hashes(paths: list[tuple[Path, int]], threads: int) -> dict[Path, str]:
    """Content hash of each file: sha256 over the sha256 of its 256 MiB segments (hashed in parallel)."""
    jobs = [(path, offset, min(SEGMENT_BYTES, size - offset))
            for path, size in paths for offset in range(0, max(size, 1), SEGMENT_BYTES)]
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="egm-fingerprint") as pool:
        digests = list(pool.map(lambda job: _hash_segment(*job), jobs))
    out: dict[Path, hashlib._Hash] = {}
    for (path, _, _), digest in zip(jobs, digests):
        out.setdefault(path, hashlib.sha256(b"egm-segments\0")).update(digest)
    return {path: h.hexdigest() for path, h in out.items()}


# --------------------------------------------------------------------------- the cache


def _cache_candidates(folder: Path, state_dir: Path | None) -> list[Path]:
    out = [folder / CACHE_FILE]
    if state_dir is not None:
        key = hashlib.sha256(str(folder).encode()).hexdigest()[:20]
        out.append(state_dir / "fingerprints" / f"{key}.json")
    return out


def _read_cache(candidates: list[Path], folder: Path) -> dict[str, dict]:
    for path in candidates:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("format") == CACHE_FORMAT and data.get("folder") == str(folder):
            return data.get("files") or {}
    return {}


def _write_cache(candidates: list[Path], folder: Path, files: dict[str, dict]) -> str | None:
    """Beside the checkpoint if it is writable, else under the state dir; None when neither is."""
    text = json.dumps({"format": CACHE_FORMAT, "folder": str(folder), "files": files}, indent=1, sort_keys=True)
    for path in candidates:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, path)
            return str(path)
        except OSError:
            tmp.unlink(missing_ok=True)
    log.warning("fingerprint cache not written: neither the checkpoint folder nor EGM_STATE_DIR is writable",
                extra={"folder": str(folder)})
    return None


def checkpoint_fingerprint(folder: str | Path, state_dir: str | Path | None = None,
                           threads: int | None = None) -> Fingerprint:
    """The content fingerprint of a checkpoint folder (see the module docstring)."""
    started = time.perf_counter()
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise FingerprintError(f"{folder} is not a folder")
    state = Path(state_dir).expanduser().resolve() if state_dir else None
    candidates = _cache_candidates(root, state)
    cached = _read_cache(candidates, root)
    files = model_files(root)
    if not files:
        raise FingerprintError(f"{root} holds no model files ({', '.join(sorted(HASHED_SUFFIXES))})")

    entries: dict[str, dict] = {}
    todo: list[tuple[Path, int]] = []
    for path in files:
        name = path.relative_to(root).as_posix()
        st = path.stat()  # follows symlinks: hub snapshots link to their blobs
        entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino,
                 "sampled": sampled_digest(path, st.st_size)}
        old = cached.get(name)
        if old and old.get("sha256") and all(old.get(k) == v for k, v in entry.items()):
            entry["sha256"] = old["sha256"]
        else:
            todo.append((path, st.st_size))
        entries[name] = entry
    full = _full_hashes(todo, threads or min(8, os.cpu_count() or 1)) if todo else {}
    for path, _ in todo:
        entries[path.relative_to(root).as_posix()]["sha256"] = full[path]

    cache_path = None
    if todo or not cached or set(cached) != set(entries):
        cache_path = _write_cache(candidates, root, entries)
    overall = hashlib.sha256()
    for name in sorted(entries):
        overall.update(name.encode() + b"\0" + entries[name]["sha256"].encode() + b"\0")
    return Fingerprint(digest=overall.hexdigest(), files={n: e["sha256"] for n, e in entries.items()},
                       hashed_bytes=sum(size for _, size in todo), cached_files=len(files) - len(todo),
                       seconds=time.perf_counter() - started, cache_path=cache_path)

"""Checkpoint fingerprint benchmark: what a worker spends identifying a 9 GB checkpoint at start-up.

The worker's model_version includes a content hash of the checkpoint (worker/fingerprint.py): every
weight file is hashed in full once, then cached beside the checkpoint; later starts check each file's
size, mtime, inode and a sampled digest (safetensors header + a few KiB of every tensor) and hash
nothing. This writes a synthetic checkpoint shaped like EGM-4B (two safetensors shards of bf16
tensors with EGM-4B's sizes, about 8.9 GB, plus its small JSON files) and times:

* first start, page cache cold (the files were evicted with posix_fadvise, as after a reboot or on
  a fresh node): read from disk and hashed;
* first start, page cache warm (a freshly downloaded or copied checkpoint);
* a later start: the cache answers (stat + sampled digest only).

Usage: ``python3 bench/fingerprint.py [--size-gb 8.9] [--dir /tmp] [--threads N] [--machine NAME] [--out DIR]``
(standard library only). Prints a table and writes ``<out>/fingerprint-<machine>.{json,md}`` (default
``bench/results``). Needs ``--size-gb`` of free disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model  # noqa: E402  (bench/machine.py)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
    from egm.worker.fingerprint import CACHE_FILE, checkpoint_fingerprint
except ImportError:  # not installed (a bare machine): the module is standard-library only, load it by path
    import importlib.util

    _spec = importlib.util.spec_from_file_location("egm_fingerprint", REPO / "worker" / "fingerprint.py")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _module  # dataclasses look their module up while it loads
    _spec.loader.exec_module(_module)
    CACHE_FILE, checkpoint_fingerprint = _module.CACHE_FILE, _module.checkpoint_fingerprint

#: (shape, count per layer) of EGM-4B's bf16 tensors, roughly: 36 text layers of a 2560-wide
#: Qwen3 with a 9728 MLP, plus the vision tower; enough to get the tensor count and sizes right.
LAYER_TENSORS = [((2560, 2560), 2), ((1024, 2560), 2), ((9728, 2560), 2), ((2560, 9728), 1), ((2560,), 2),
                 ((128,), 2)]
EMBEDDING = (151936, 2560)
BF16 = 2


def _tensor_plan(target_bytes: int) -> list[tuple[str, tuple[int, ...]]]:
    plan, size = [], 0
    if target_bytes >= 4e9:  # the embeddings alone are 1.6 GB: only in full-size runs
        plan = [("model.embed_tokens.weight", EMBEDDING), ("lm_head.weight", EMBEDDING)]
        size = 2 * EMBEDDING[0] * EMBEDDING[1] * BF16
    layer = 0
    while size < target_bytes:
        for k, (shape, count) in enumerate(LAYER_TENSORS):
            for c in range(count):
                n = 1
                for d in shape:
                    n *= d
                plan.append((f"model.layers.{layer}.t{k}_{c}.weight", shape))
                size += n * BF16
        layer += 1
    return plan


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], chunk: bytes) -> int:
    header, offset = {}, 0
    for name, shape in tensors:
        n = BF16
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        left, i = offset, 0
        while left > 0:
            piece = chunk[: min(len(chunk), left)]
            f.write(piece[:-8] + i.to_bytes(8, "little") if len(piece) > 8 else piece)  # no two chunks alike
            left -= len(piece)
            i += 1
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset


def build_checkpoint(folder: Path, size_gb: float) -> tuple[int, int]:
    """An EGM-4B-shaped checkpoint: (bytes, tensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    plan = _tensor_plan(int(size_gb * 1e9))
    half = len(plan) // 2
    chunk = os.urandom(64 * 1024 * 1024)
    total = 0
    for i, part in enumerate((plan[:half], plan[half:]), 1):
        total += _write_shard(folder / f"model-0000{i}-of-00002.safetensors", part, chunk)
    for name, body in {"config.json": {"model_type": "qwen3_vl", "hidden_size": 2560},
                       "generation_config.json": {"do_sample": False},
                       "tokenizer_config.json": {"model_max_length": 262144},
                       "model.safetensors.index.json": {"weight_map": {n: "shard" for n, _ in plan[:50]}}}.items():
        (folder / name).write_text(json.dumps(body))
        total += (folder / name).stat().st_size
    return total, len(plan)


def evict(folder: Path) -> None:
    """Drop the files' pages from the page cache (no root needed), so the next read comes from disk."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="egm-bench-fingerprint-", dir=args.dir))
    folder = workdir / "EGM-4B-synthetic"
    try:
        t0 = time.perf_counter()
        size, tensors = build_checkpoint(folder, args.size_gb)
        print(f"wrote {size / 1e9:.2f} GB, {tensors} tensors in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = []
        for label, cold in (("first start, page cache cold", True), ("first start, page cache warm", False)):
            (folder / CACHE_FILE).unlink(missing_ok=True)
            if cold:
                evict(folder)
            fp = checkpoint_fingerprint(folder, workdir / "state", threads=args.threads)
            rows.append({"case": label, "seconds": round(fp.seconds, 3), "hashed_gb": round(fp.hashed_bytes / 1e9, 2),
                         "gb_per_s": round(fp.hashed_bytes / 1e9 / fp.seconds, 2), "digest": fp.digest[:16]})
            print(f"{label:34} {fp.seconds:8.2f} s", flush=True)
        evict(folder)  # a later start on a rebooted node: the cache must not need the weights' pages
        fp = checkpoint_fingerprint(folder, workdir / "state", threads=args.threads)
        rows.append({"case": "later start, fingerprint cached (page cache cold)", "seconds": round(fp.seconds, 3),
                     "hashed_gb": round(fp.hashed_bytes / 1e9, 2), "gb_per_s": None, "digest": fp.digest[:16]})
        print(f"{rows[-1]['case']:34} {fp.seconds:8.3f} s", flush=True)
        assert len({r["digest"] for r in rows}) == 1, "the three runs must agree"
        return {"size_gb": round(size / 1e9, 2), "tensors": tensors, "rows": rows}
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)



def table(result: dict) -> str:
    lines = ["| case | seconds | hashed GB | GB/s |", "|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['case']} | {r['seconds']:.3f} | {r['hashed_gb']:.2f} | "
                     f"{'-' if r['gb_per_s'] is None else r['gb_per_s']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=8.9, help="checkpoint size (EGM-4B bf16: about 8.9 GB)")
    p.add_argument("--dir", default=None, help="where to write it (default: the temp folder)")
    p.add_argument("--threads", type=int, default=None, help="hashing threads (default: the worker's, min(8, cpus))")
    p.add_argument("--machine", default=platform.node() or "local", help="name used in the results file")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="results folder")
    args = p.parse_args()
    result = run(args)
    meta = {"machine": args.machine, "cpus": os.cpu_count(), "cpu": cpu_model(),
            "threads": args.threads or min(8, os.cpu_count() or 1), "python": platform.python_version(),
            "size_gb": result["size_gb"], "tensors": result["tensors"], "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / f"fingerprint-{args.machine}.json").write_text(json.dumps({"meta": meta, "rows": result["rows"]},
                                                                     indent=1))
    (out / f"fingerprint-{args.machine}.md").write_text(
        f"# Checkpoint fingerprint ({args.machine})\n\n" + "".join(f"- {k}: {v}\n" for k, v in meta.items())
        + "\n" + table(result) + "\n")
    print("\n" + table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``egm-assist build-tiny-model``: a tiny random-weight Qwen3-VL checkpoint, built locally (no downloads)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("build-tiny-model", help="build a tiny random Qwen3-VL checkpoint for tests and demos")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from egm.cli.commands._common import step_printer
    from egm.worker.tiny_model import build_tiny_checkpoint

    print(f"building a tiny checkpoint in {args.out} (240 training steps on the CPU; progress below) ...", flush=True)
    path = build_tiny_checkpoint(args.out, seed=args.seed, progress=step_printer("training step"))
    print(f"tiny checkpoint written to {path} (random weights: boxes are meaningless)")
    return 0

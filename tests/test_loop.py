"""The closed loop's plumbing at tiny size: every stage of bench/loop.py on the real pieces.

Scenes -> v0 (the tiny model) pre-annotates both splits through ``egm-assist prelabel`` (Redis,
a worker, the transformers engine, Label Studio) -> the annotator's corrections through
Label Studio's API -> ``egm-assist export`` -> the GPU stage on the CPU (a few seconds of SFT and
GRPO on the tiny size) -> v1 unpacked and served through the pipeline under its own
model_version -> held-out figures read back from Label Studio -> the report. Whether v1 learns
anything is the GPU run's question (docs/loop.md); this checks that every hand-over holds.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import loop  # noqa: E402  (bench/loop.py)
from closed_loop.workspace import Workspace  # noqa: E402

pytestmark = pytest.mark.timeout(900)


class FixtureStack:
    """The test session's Label Studio and Redis in place of the loop's own."""

    def __init__(self, ls, redis_url: str) -> None:
        self.ls, self.redis_url = ls, redis_url

    def label_studio(self):
        return self.ls

    def redis(self) -> str:
        return self.redis_url

    def close(self) -> None:
        pass


def test_every_stage_hands_over_to_the_next(label_studio, redis_url, tiny_model_dir, tmp_path) -> None:
    root = label_studio.local_files_root / f"loop-{secrets.token_hex(3)}"
    ws = Workspace(root)
    stack = FixtureStack(label_studio, redis_url)

    def run(*argv: str) -> object:
        return loop.parse_args(["--dir", str(root), *argv])

    shutil.copytree(tiny_model_dir, ws.model("v0"))  # what `prepare` would build
    assert loop.cmd_prepare(ws, run("prepare", "--train", "5", "--heldout", "3", "--trained-size", "tiny",
                                    "--pixels", "16384", "--max-new-tokens", "96")) == 0
    manifest = ws.manifest()
    train_objects = sum(len(json.loads(line)["objects"])
                        for line in (ws.scenes("train") / "scenes.jsonl").read_text().splitlines())

    args = run("prelabel", "--model", "v0", "--engine-batch", "4", "--job-size", "8")
    assert loop.cmd_prelabel(ws, args, stack) == 0
    v0 = ws.state["versions"]["v0"]
    client = label_studio.client()
    for split in ("train", "heldout"):
        predictions = [p for p in client.list_predictions(project_id=ws.state["projects"][split])
                       if p.model_version == v0]
        assert len(predictions) == manifest["scenes"][split]["count"], split

    assert loop.cmd_annotate(ws, run("annotate"), stack) == 0
    annotate = ws.state["stages"]["annotate"]
    assert annotate["annotated"] == 5 and annotate["kept"] + annotate["drawn"] == train_objects
    assert loop.cmd_annotate(ws, run("annotate"), stack) == 0
    assert ws.state["stages"]["annotate"]["already"] == 5, "a second run annotates nothing twice"

    assert loop.cmd_export(ws, run("export"), stack) == 0
    summary = ws.state["stages"]["export"]["summary"]
    assert summary["annotations"]["accepted"] == 5 and summary["samples"] == train_objects
    rows = (ws.export / "sft" / "train.jsonl").read_text().splitlines()
    rows += (ws.export / "sft" / "val.jsonl").read_text().splitlines()
    assert len(rows) == train_objects

    out = tmp_path / "gpu-out"
    assert loop.cmd_train(ws, run("train", "--out", str(out), "--tiny")) == 0
    figures = json.loads((out / "loop-gpu.json").read_text())
    assert "error" not in figures, figures.get("error")
    assert figures["sft"]["steps"] > 0 and figures["sft"]["loss_curve"]
    assert figures["sft_rows"]["augment"] == ["mirror", "channels"] and figures["sft_rows"]["variant_rows"] > 0
    curve = figures["sft"]["eval_curve"]
    assert curve and {"found_share", "train_found_share"} <= set(curve[0]), "held-out and train scenes measured"
    assert figures["v1_train_scenes"]["multi"]["objects"] > 0
    assert set(figures["v1"]) == {"multi", "per_label"} and figures["v1"]["multi"]["objects"] > 0
    assert figures["grpo"]["steps"] > 0 and figures["grpo"]["reward_curve"]
    assert {p.name for p in out.iterdir()} >= {"v1.tar", "v1-grpo.tar", "loop-gpu.json", "train.log"}

    assert loop.cmd_unpack(ws, run("unpack", "--gpu-out", str(out))) == 0
    args = run("prelabel", "--model", "v1", "--split", "heldout", "--engine-batch", "4")
    assert loop.cmd_prelabel(ws, args, stack) == 0
    assert ws.state["versions"]["v1"] != v0, "v1 is served under its own model_version"
    assert "prelabel-v1-heldout" in ws.state["stages"]

    assert loop.cmd_evaluate(ws, run("evaluate", "--models", "v0", "v1"), stack) == 0
    heldout = ws.state["heldout"]
    held_objects = sum(len(json.loads(line)["objects"])
                       for line in (ws.scenes("heldout") / "scenes.jsonl").read_text().splitlines())
    assert heldout["v0"]["objects"] == held_objects and heldout["v0"]["predictions"] == 3
    assert heldout["v0"]["predicted_boxes"] == 3, "v0 answers one fixed box per image"

    results = tmp_path / "results"
    assert loop.cmd_report(ws, run("report", "--machine", "test", "--results", str(results))) == 0
    report = json.loads((results / "loop-test.json").read_text())
    assert report["heldout_pipeline"]["v0"]["found_share"] == heldout["v0"]["found_share"]
    assert "## Held-out scenes through the pipeline" in (results / "loop-test.md").read_text()

"""bench/sft_recipe.py at tiny size: the loop's rows built from the scenes' true boxes, their picture
variants, and learning curves on held-out and train scenes in its results file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import sft_recipe  # noqa: E402  (bench/sft_recipe.py)

from egm.scenes import read_scenes  # noqa: E402


def test_a_recipe_try_writes_rows_curves_and_figures(tmp_path) -> None:
    results = tmp_path / "results"
    argv = ["--train", "4", "--heldout", "3", "--curve-scenes", "2", "--seconds", "6", "--eval-every", "2",
            "--size", "tiny", "--batch-size", "4", "--dir", str(tmp_path / "scenes"), "--results", str(results)]
    assert sft_recipe.main(argv) == 0
    (path,) = results.glob("sft-recipe-*.json")
    result = json.loads(path.read_text())
    objects = sum(len(s.objects) for s in read_scenes(tmp_path / "scenes" / "train-4"))
    # one referring row per object and one multi-category row per scene, each in six pictures
    assert result["rows"]["rows"] == 6 * (objects + 4) and result["rows"]["images"] == 6 * 4
    assert result["eval_curve"], "the learning curve was measured"
    assert {"found_share", "train_found_share", "mean_iou", "train_mean_iou"} <= set(result["eval_curve"][0])
    assert result["final"]["heldout"]["objects"] == sum(len(s.objects)
                                                        for s in read_scenes(tmp_path / "scenes" / "heldout-3"))
    assert result["final"]["train_scenes"]["objects"] == sum(len(s.objects) for s in
                                                             read_scenes(tmp_path / "scenes" / "train-4")[:2])

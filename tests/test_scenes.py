"""Synthetic scenes: the picture holds exactly the objects their boxes say; scoring counts what it should."""

from __future__ import annotations

import pytest

from egm.geometry import Box
from egm.scenes import FOUND_IOU, LABELS, make_scene, read_scenes, sample_scenes, score, write_scenes


def _background(image, x: int, y: int) -> bool:
    """A pixel is background when it matches the gradient colour of its row at the left border."""
    row_colour = image.getpixel((0, y))
    return sum(abs(a - b) for a, b in zip(image.getpixel((x, y)), row_colour)) < 30


def test_same_seed_same_scene_and_different_seeds_differ() -> None:
    a_img, a = make_scene(7)
    b_img, b = make_scene(7)
    assert a == b and a_img.tobytes() == b_img.tobytes()
    assert make_scene(8)[1] != a


@pytest.mark.parametrize("seed", range(12))
def test_boxes_are_the_drawn_extent_of_each_shape(seed: int) -> None:
    image, scene = make_scene(seed)
    assert 1 <= len(scene.objects) <= 3
    assert len({o.label for o in scene.objects}) == len(scene.objects)
    assert all(o.label in LABELS for o in scene.objects)
    for obj in scene.objects:
        x1, y1, x2, y2 = (int(v) for v in obj.pixels.to_list())
        cx, cy = (x1 + x2) // 2, (y1 + y2 - 1) // 2 + (obj.label == "triangle") * (y2 - y1) // 4
        assert not _background(image, cx, cy), f"{obj.label} not drawn at its centre"
        # every side of the box touches the shape, and a pixel outside the box is background
        assert any(not _background(image, x, y1) for x in range(x1, x2)), "top edge"
        assert any(not _background(image, x, y2 - 1) for x in range(x1, x2)), "bottom edge"
        assert any(not _background(image, x1, y) for y in range(y1, y2)), "left edge"
        assert any(not _background(image, x2 - 1, y) for y in range(y1, y2)), "right edge"
        assert _background(image, max(0, x1 - 2), cy) and _background(image, min(scene.width - 1, x2 + 1), cy)
        g = obj.grid
        assert g.x1 == pytest.approx(x1 / scene.width * 1000) and g.y2 == pytest.approx(y2 / scene.height * 1000)


def test_scenes_round_trip_through_the_folder(tmp_path) -> None:
    written = write_scenes(tmp_path, [3, 4, 5])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene-3.jpg", "scene-4.jpg", "scene-5.jpg", "scenes.jsonl"]
    read = read_scenes(tmp_path)
    assert [s.seed for s in read] == [3, 4, 5]
    assert [[o.label for o in s.objects] for s in read] == [[o.label for o in s.objects] for s in written]
    assert read[0].objects[0].grid.to_list(1) == written[0].objects[0].grid.to_list(1)


def test_score_pairs_boxes_by_label_one_to_one() -> None:
    _, scene = make_scene(11)
    truth = {o.label: o.grid for o in scene.objects}
    label, box = next(iter(truth.items()))
    shifted = Box(box.x1 + 0.3 * box.width, box.y1, box.x2 + 0.3 * box.width, box.y2)  # IoU ~0.54
    other = next(x for x in LABELS if x not in truth) if len(truth) < 3 else None
    predictions = [(label, shifted), (label, box)]
    if other:
        predictions.append((other, box))  # right place, wrong label: finds nothing
    s = score([(scene, predictions)])
    assert s.objects == len(scene.objects) and s.predicted == len(predictions)
    assert s.found == 1 and s.iou_sum == pytest.approx(1.0), "the exact box is paired, the shifted one is extra"
    assert s.precision == pytest.approx(1 / len(predictions))
    s = score([(scene, [(label, shifted)])])
    assert s.found == (shifted.iou(box) >= FOUND_IOU) and s.mean_iou == pytest.approx(shifted.iou(box) / len(truth))
    assert score([(scene, [])]).to_json()["found_share"] == 0.0


def test_bundled_samples_have_their_true_boxes() -> None:
    samples = sample_scenes()
    assert sorted(p.name for p, _ in samples) == ["rotated_exif6.jpg", "shapes.jpg", "tall.jpg", "wide.jpg"]
    from PIL import Image, ImageOps

    for path, scene in samples:
        with Image.open(path) as im:
            upright = ImageOps.exif_transpose(im).convert("RGB")
        assert upright.size == (scene.width, scene.height)
        for obj in scene.objects:
            x1, y1, x2, y2 = (int(v) for v in obj.pixels.to_list())
            assert not _background(upright, (x1 + x2) // 2, (y1 + y2) // 2 + 10), (path.name, obj.label)
            assert _background(upright, max(0, x1 - 4), (y1 + y2) // 2), (path.name, obj.label)

"""Coordinates survive the export whatever the image: EXIF orientations, non-square, border boxes.

The path under test is the exporter's own: Label Studio percent (relative to the upright
image the browser shows) -> ``parse_result`` (0..1000 grid) -> pixels of the image file the
export wrote (``ImageCollector``), whose pixels must be upright so any trainer agrees.
"""

from __future__ import annotations

import pytest
from PIL import Image

from egm.config.settings import Settings
from egm.export.coco import CocoImage, coco_document
from egm.export.images import ImageCollector
from egm.export.regions import parse_result
from egm.geometry import Box, EXIF_ORIENTATIONS, grid_to_pixels, pixels_to_percent
from tests.images_factory import QUADRANT_COLORS, close_to, make_upright_jpeg, quadrant_centers

UPRIGHT_W, UPRIGHT_H = 640, 360  # non-square on purpose
#: upright pixel boxes: one inside, one touching every border, one thin strip on the right edge.
BOXES = [Box(100.0, 50.0, 300.5, 200.25), Box(0.0, 0.0, 640.0, 360.0), Box(637.0, 0.0, 640.0, 360.0)]


def ls_item(rid: str, box: Box, width: int, height: int) -> dict:
    """A rectangle exactly as Label Studio stores it for an image it shows at width x height."""
    rect = pixels_to_percent(box, width, height)
    return {"id": rid, "from_name": "label", "to_name": "image", "type": "rectanglelabels",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {**rect.as_value(), "rectanglelabels": ["Thing"]}}


@pytest.fixture()
def collector(tmp_path):
    root = tmp_path / "files"
    root.mkdir()
    settings = Settings(local_files_root=str(root))
    return root, ImageCollector(tmp_path / "out", settings), tmp_path / "out"


@pytest.mark.parametrize("orientation", list(EXIF_ORIENTATIONS))
def test_percent_grid_pixels_round_trip_for_every_exif_orientation(collector, orientation):
    root, images, out = collector
    (root / f"o{orientation}.jpg").write_bytes(make_upright_jpeg(UPRIGHT_W, UPRIGHT_H, orientation))
    entry = images.collect(f"o{orientation}.jpg")
    assert entry.ok, entry.error
    assert (entry.width, entry.height, entry.orientation) == (UPRIGHT_W, UPRIGHT_H, orientation)

    # the file in the dataset is upright, whatever a trainer does with EXIF
    with Image.open(out / entry.rel_path) as written:
        assert written.size == (UPRIGHT_W, UPRIGHT_H)
        assert written.getexif().get(0x0112, 1) == 1
        rgb = written.convert("RGB")
        for quadrant, (x, y) in quadrant_centers(UPRIGHT_W, UPRIGHT_H).items():
            assert close_to(rgb.getpixel((x, y)), QUADRANT_COLORS[quadrant]), (orientation, quadrant)

    parsed = parse_result([ls_item(str(i), b, UPRIGHT_W, UPRIGHT_H) for i, b in enumerate(BOXES)])
    assert len(parsed.regions) == len(BOXES)
    for region, expected in zip(parsed.regions, BOXES):
        px = grid_to_pixels(region.grid, entry.width, entry.height)
        assert max(abs(a - b) for a, b in zip(px.to_list(), expected.to_list())) <= 1.0, (orientation, px)
        assert 0.0 <= px.x1 < px.x2 <= entry.width and 0.0 <= px.y1 < px.y2 <= entry.height

    doc = coco_document([CocoImage(task_id=1, image=entry, regions=parsed.regions, split="train")], ["Thing"])
    for ann, expected in zip(doc["annotations"], BOXES):
        x, y, w, h = ann["bbox"]
        assert max(abs(x - expected.x1), abs(y - expected.y1), abs(x + w - expected.x2),
                   abs(y + h - expected.y2)) <= 1.0


def test_unrotated_local_images_are_copied_verbatim_and_deduplicated(collector):
    root, images, out = collector
    data = make_upright_jpeg(200, 100, 1)
    (root / "a.jpg").write_bytes(data)
    (root / "b.jpg").write_bytes(data)
    first, second = images.collect("a.jpg"), images.collect("b.jpg")
    assert first.rel_path == second.rel_path and (out / first.rel_path).read_bytes() == data


def test_link_mode_links_local_files(tmp_path):
    root = tmp_path / "files"
    root.mkdir()
    data = make_upright_jpeg(64, 32, 1)
    (root / "a.jpg").write_bytes(data)
    images = ImageCollector(tmp_path / "out", Settings(local_files_root=str(root)), mode="link")
    entry = images.collect("a.jpg")
    target = tmp_path / "out" / entry.rel_path
    assert target.read_bytes() == data
    assert target.is_symlink() or target.stat().st_ino == (root / "a.jpg").stat().st_ino


def test_broken_images_are_reported_not_raised(collector):
    root, images, _ = collector
    (root / "bad.jpg").write_bytes(b"not an image")
    bad = images.collect("bad.jpg")
    assert not bad.ok and bad.rel_path is None and "bad.jpg" in bad.error
    missing = images.collect("missing.jpg")
    assert not missing.ok and "not found" in missing.error

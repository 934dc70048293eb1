"""Coordinate conventions: 0-1000 grid, pixels, Label Studio percent, EXIF orientation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from egm.geometry import (
    Box, PercentRect, grid_to_percent, grid_to_pixels, greedy_match, percent_from_value, percent_to_grid,
    percent_to_pixels, pixels_to_grid, pixels_to_percent, sanitize_grid, stored_to_upright, upright_size,
    upright_to_stored,
)

SIZES = [(640, 480), (480, 640), (1920, 1080), (37, 1013), (1, 1), (4000, 3000)]
coord = st.floats(min_value=-5000, max_value=5000, allow_nan=False, allow_infinity=False)


def test_grid_to_pixels_matches_qwen3_vl_convention():
    # pixel = v / 1000 * size (REFERENCE.md 1), on a non-square image.
    px = grid_to_pixels(Box(444, 468, 757, 745), 640, 480)
    assert px.to_list(2) == [284.16, 224.64, 484.48, 357.6]


@pytest.mark.parametrize("w,h", SIZES)
def test_grid_pixels_round_trip(w, h):
    box = Box(100, 250, 900, 751)
    back = pixels_to_grid(grid_to_pixels(box, w, h, min_size=0), w, h)
    for a, b in zip(box.to_list(), back.to_list()):
        assert a == pytest.approx(b, abs=1e-9)


@pytest.mark.parametrize("w,h", SIZES)
def test_percent_round_trip_within_one_pixel(w, h):
    px = Box(0.25 * w, 0.1 * h, 0.8 * w, h)  # touches the bottom border
    rect = pixels_to_percent(px, w, h)
    back = percent_to_pixels(rect, w, h)
    assert all(abs(a - b) < 1 for a, b in zip(px.to_list(), back.to_list()))
    grid = percent_to_grid(rect)
    again = grid_to_pixels(grid, w, h, min_size=0)
    assert all(abs(a - b) < 1 for a, b in zip(px.to_list(), again.to_list()))


def test_grid_to_percent_needs_no_size():
    rect = grid_to_percent(Box(100, 200, 600, 700))
    assert (rect.x, rect.y, rect.width, rect.height) == (10, 20, 50, 50)


def test_swapped_and_out_of_range_are_sanitized():
    assert sanitize_grid(Box(900, 800, -20, 1200)).to_list() == [0, 800, 900, 1000]


def test_degenerate_box_grows_to_one_pixel_inside_image():
    px = grid_to_pixels(Box(1000, 1000, 1000, 1000), 640, 480)
    assert px.width == pytest.approx(1) and px.height == pytest.approx(1)
    assert px.x2 <= 640 and px.y2 <= 480


def test_zero_size_image_is_an_error():
    with pytest.raises(ValueError, match="positive"):
        grid_to_pixels(Box(0, 0, 10, 10), 0, 480)


@given(coord, coord, coord, coord, st.sampled_from(SIZES))
@settings(max_examples=300, deadline=None)
def test_any_box_lands_inside_the_image(x1, y1, x2, y2, size):
    w, h = size
    px = grid_to_pixels(Box(x1, y1, x2, y2), w, h)
    assert 0 <= px.x1 <= px.x2 <= w and 0 <= px.y1 <= px.y2 <= h
    rect = pixels_to_percent(px, w, h)
    assert 0 <= rect.x and rect.x + rect.width <= 100 + 1e-9
    assert 0 <= rect.y and rect.y + rect.height <= 100 + 1e-9


def _image_with_block(w, h, block, orientation):
    img = Image.new("L", (w, h), 0)
    x1, y1, x2, y2 = block
    img.paste(255, (x1, y1, x2, y2))
    img.getexif()[0x0112] = orientation
    return img


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("w,h", [(40, 30), (30, 41)])
def test_exif_mapping_agrees_with_pillow(orientation, w, h):
    block = (5, 3, 9, 6)
    upright = ImageOps.exif_transpose(_image_with_block(w, h, block, orientation))
    assert upright.size == upright_size(w, h, orientation)
    mapped = stored_to_upright(Box(*block), w, h, orientation)
    assert tuple(int(v) for v in mapped.to_list()) == upright.getbbox()
    assert upright_to_stored(mapped, w, h, orientation) == Box(*block)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_round_trip_through_label_studio_percent(orientation):
    # A box drawn in Label Studio (upright, percent) -> grid -> stored pixels -> back agrees within a pixel.
    w, h = 4000, 3000
    uw, uh = upright_size(w, h, orientation)
    rect = PercentRect(12.5, 40.0, 30.0, 60.0)  # touches the bottom border
    upright_px = grid_to_pixels(percent_to_grid(rect), uw, uh)
    stored = upright_to_stored(upright_px, w, h, orientation)
    assert 0 <= stored.x1 <= stored.x2 <= w and 0 <= stored.y1 <= stored.y2 <= h
    back = pixels_to_percent(stored_to_upright(stored, w, h, orientation), uw, uh)
    for a, b in zip((rect.x, rect.y, rect.width, rect.height), (back.x, back.y, back.width, back.height)):
        assert abs(a - b) / 100 * max(uw, uh) < 1


def test_rotated_label_studio_rectangle_becomes_its_hull():
    rect = percent_from_value({"x": 10, "y": 10, "width": 20, "height": 10, "rotation": 90})
    assert rect.x == pytest.approx(0) and rect.y == pytest.approx(10)
    assert rect.width == pytest.approx(10) and rect.height == pytest.approx(20)


def test_greedy_match_pairs_best_overlaps_once():
    a = [Box(0, 0, 10, 10), Box(100, 100, 200, 200)]
    b = [Box(101, 101, 200, 200), Box(1, 1, 10, 10), Box(500, 500, 600, 600)]
    pairs = {(i, j) for i, j, _ in greedy_match(a, b)}
    assert pairs == {(0, 1), (1, 0)}

"""Geometry and the zoom parser, exact to the reference rules (ergo-reference.md §2.3-§2.5)."""

import random

import pytest
from PIL import Image

from processing_ergo.geometry_ergo import (
    MIN_PIXELS,
    box_scale,
    budget_to_pixels,
    crop_region,
    crop_size,
    map_box_to_original,
    parse_zoom_box,
    smart_resize,
    vision_tokens,
)


@pytest.mark.parametrize(
    "height, width, budget, expected",
    [
        (1582, 2246, 640, (588, 840)),
        (1582, 2246, 1280, (840, 1204)),
        (2160, 3840, 640, (532, 952)),
        (4320, 7680, 640, (532, 952)),
        (1080, 1920, 640, (532, 952)),
        (2160, 3840, 1280, (756, 1344)),
        (3024, 4032, 640, (616, 812)),
        (3000, 4000, 640, (616, 812)),
        (3024, 4032, 1280, (868, 1148)),
    ],
)
def test_coarse_sizes_match_the_reference_table(height, width, budget, expected):
    assert smart_resize(height, width, max_pixels=budget_to_pixels(budget)) == expected


def test_rounding_can_exceed_the_budget_as_in_the_reference():
    height, width = smart_resize(2160, 3840, max_pixels=budget_to_pixels(640))
    assert vision_tokens(width, height) == 646 > 640


@pytest.mark.parametrize(
    "region_size, expected",
    [((200, 150), (196, 140)), ((40, 30), (84, 56)), ((1000, 800), (1008, 812)),
     ((1500, 1200), (1120, 896)), ((10, 5), (84, 56))],
)
def test_crop_sizes_match_the_reference_examples(region_size, expected):
    region = (7, 9, 7 + region_size[0], 9 + region_size[1])
    assert crop_size(region, budget_to_pixels(1280)) == expected


def test_smart_resize_properties_on_random_sizes():
    rng = random.Random(0)
    for _ in range(2000):
        height, width = rng.randint(1, 9000), rng.randint(1, 9000)
        if max(height, width) / min(height, width) > 150:
            continue
        budget = rng.choice([16, 64, 640, 1280])
        h, w = smart_resize(height, width, max_pixels=budget_to_pixels(budget))
        assert h % 28 == 0 and w % 28 == 0 and h >= 28 and w >= 28
        assert h * w >= MIN_PIXELS
        # Rounding overshoots the budget by at most one row and one column of tokens.
        assert vision_tokens(w, h) <= budget + h // 28 + w // 28 + 1


def test_smart_resize_never_returns_zero_where_the_reference_would():
    # The reference's over-budget branch rounds 100 / 7.47 / 28 down to 0 here.
    assert smart_resize(100, 7000, max_pixels=budget_to_pixels(16)) == (28, 16 * 28)
    assert smart_resize(2000, 1, max_pixels=budget_to_pixels(64)) == (64 * 28, 28)


def test_smart_resize_rejects_empty_sizes():
    with pytest.raises(ValueError, match="empty"):
        smart_resize(0, 10)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>x</think><zoom>[1, 2, 3, 4]</zoom>", (1, 2, 3, 4)),
        ("<zoom>  [10,20,  30,40]\n</zoom>", (10, 20, 30, 40)),
        ("<zoom>the box is [5, 6, 7, 8] here</zoom>", (5, 6, 7, 8)),
        ('<zoom>{"bbox_2d": [5, 6, 7, 8]}</zoom>', (5, 6, 7, 8)),  # one box found by findall, as in the code
        ("<zoom>[1, 2, 3, 4]</zoom> <zoom>[9, 9, 9, 9]</zoom>", (1, 2, 3, 4)),  # first block only
        ("<zoom>[1, 2, 3, 4] [5, 6, 7, 8]</zoom>", None),  # two boxes
        ("<zoom>[1.5, 2, 3, 4]</zoom>", None),  # float
        ("<zoom>[-1, 2, 3, 4]</zoom>", None),  # negative
        ("<zoom>[1 , 2, 3, 4]</zoom>", None),  # space before a comma
        ("<zoom>[1, 2, 3]</zoom>", None),
        ("[1, 2, 3, 4]", None),  # no zoom block
        ("<zoom>[1, 2, 3, 4]", None),  # unclosed
        ("", None),
    ],
)
def test_parse_zoom_box_follows_the_reference_rules(text, expected):
    assert parse_zoom_box(text) == expected


def test_parse_zoom_box_keeps_inverted_boxes_for_the_mapper_to_judge():
    assert parse_zoom_box("<zoom>[30, 40, 10, 20]</zoom>") == (30, 40, 10, 20)


def test_map_box_scales_per_axis_clamps_and_truncates():
    # 2246x1582 seen as 840x588: scales 2246/840 and 1582/588.
    sx, sy = 2246 / 840, 1582 / 588
    assert map_box_to_original((100, 50, 200, 150), sx, sy, 2246, 1582) == (
        int(100 * sx), int(50 * sy), int(200 * sx), int(150 * sy))
    assert map_box_to_original((0, 0, 9999, 9999), sx, sy, 2246, 1582) == (0, 0, 2246, 1582)


@pytest.mark.parametrize("box", [(30, 40, 10, 20), (10, 10, 10, 50), (900, 0, 950, 10)])
def test_map_box_reports_degenerate_boxes(box):
    # inverted, zero-width, and entirely outside the image (clamped to zero width)
    assert map_box_to_original(box, 1.0, 1.0, 800, 600) is None


def test_crop_keeps_native_resolution_and_uses_lanczos():
    image = Image.new("RGB", (1000, 800))
    image.paste((255, 0, 0), (100, 100, 300, 250))
    region = (100, 100, 300, 250)
    size = crop_size(region, budget_to_pixels(1280))
    crop = crop_region(image, region, size)
    assert crop.size == (196, 140)
    assert crop.getpixel((98, 70)) == (255, 0, 0)


def test_crop_size_rejects_crops_flatter_than_qwen_accepts():
    assert crop_size((0, 0, 9000, 1), budget_to_pixels(1280)) is None


def test_a_32_px_family_resizes_counts_and_crops_by_its_factor():
    """Qwen3-VL and Qwen3.5: the same round-based rules with 32 px per vision token (minimum 4 of them)."""
    assert budget_to_pixels(64, 32) == 64 * 32 * 32
    height, width = smart_resize(2160, 3840, 32, max_pixels=budget_to_pixels(640, 32))
    assert (height, width) == (608, 1088) and height % 32 == width % 32 == 0
    assert vision_tokens(width, height, 32) == 646  # 19 x 34: slightly over budget, as with 28 px
    assert smart_resize(10, 5, 32) == (96, 64)  # at least 4 tokens, rounded up per side: 6, as 84x56 at 28 px
    assert crop_size((0, 0, 200, 150), budget_to_pixels(1280, 32), 32) == (192, 160)


def test_relative_boxes_map_from_thousandths_of_the_image():
    scale = box_scale((1400, 900), (448, 288), "relative")
    assert scale == (1.4, 0.9) and box_scale((1400, 900), (448, 288), "absolute") == (1400 / 448, 900 / 288)
    assert map_box_to_original((0, 0, 1000, 1000), *scale, 1400, 900) == (0, 0, 1400, 900)
    assert map_box_to_original((500, 250, 750, 1200), *scale, 1400, 900) == (700, 225, 1050, 900)  # clamped

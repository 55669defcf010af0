"""curves.png: a two-panel PNG drawn with Pillow, lines where the data are."""

from __future__ import annotations

import pytest
from PIL import Image

from gradq_fx.train.plot import COLOURS, HEIGHT, PANEL_WIDTH, draw_curves, nice_ticks


def rows(count: int) -> list[dict]:
    return [
        dict(epoch=e, train_loss=2.0 / e, test_loss=2.2 / e, test_top1=50 + 10 * e)
        for e in range(1, count + 1)
    ]


def colour_columns(image: Image.Image, colour) -> set[int]:
    width, height = image.size
    pixels = image.load()
    return {x for x in range(width) for y in range(height) if pixels[x, y] == colour}


@pytest.mark.parametrize("epochs", [1, 5])
def test_draw_curves_writes_both_panels(tmp_path, epochs):
    path = tmp_path / "curves.png"
    draw_curves(rows(epochs), path)
    image = Image.open(path).convert("RGB")
    assert image.size == (2 * PANEL_WIDTH, HEIGHT)
    for name in ("train loss", "test loss"):
        columns = colour_columns(image, COLOURS[name])
        assert columns and max(columns) < PANEL_WIDTH  # left panel
    accuracy = colour_columns(image, COLOURS["test top-1"])
    assert accuracy and min(accuracy) >= PANEL_WIDTH  # right panel


@pytest.mark.parametrize(
    "low, high, step", [(0.37, 2.41, 1.0), (0.37, 1.9, 0.5), (52.5, 91.0, 10.0), (0.01, 0.05, 0.01)]
)
def test_nice_ticks_cover_the_range_in_round_steps(low, high, step):
    ticks = nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high
    assert {round(b - a, 9) for a, b in zip(ticks, ticks[1:], strict=False)} == {step}


def test_nice_ticks_of_a_single_value_surround_it():
    assert nice_ticks(3.0, 3.0)[0] < 3.0 < nice_ticks(3.0, 3.0)[-1]

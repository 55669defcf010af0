"""`curves.png`: training and test loss, and test top-1, per epoch, drawn with Pillow alone.

Two panels side by side, each with axes, "nice" tick values, axis labels, a title and a
legend. Every point is marked, so a single epoch still shows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PANEL_WIDTH, HEIGHT = 480, 360
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 40, 50
BACKGROUND, AXES, GRID, TEXT = "white", (40, 40, 40), (225, 225, 225), (20, 20, 20)
COLOURS = {"train loss": (31, 119, 180), "test loss": (255, 127, 14), "test top-1": (44, 160, 44)}


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round values (steps of 1, 2 or 5 x 10^k) covering [low, high]."""
    if not high > low:
        pad = abs(low) * 0.05 or 1.0
        low, high = low - pad, high + pad
    raw_step = (high - low) / max(1, count - 1)
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value < high + step * 0.999:
        ticks.append(round(value, 10))
        value += step
    return ticks


def tick_label(value: float) -> str:
    """A tick value as short text: plain below 10^5, else in scientific notation."""
    return f"{value:g}" if abs(value) < 1e5 else f"{value:.1e}"


def _panel(
    draw: ImageDraw.ImageDraw,
    image: Image.Image,
    left: int,
    title: str,
    y_label: str,
    epochs: Sequence[float],
    series: Mapping[str, Sequence[float]],
    font: ImageFont.ImageFont,
) -> None:
    """One panel at x offset `left`: axes, ticks, grid, one line per series, legend."""
    x0, x1 = left + MARGIN_LEFT, left + PANEL_WIDTH - MARGIN_RIGHT
    y0, y1 = MARGIN_TOP, HEIGHT - MARGIN_BOTTOM  # y0 is the top
    values = [v for points in series.values() for v in points if math.isfinite(v)]
    y_ticks = nice_ticks(min(values, default=0.0), max(values, default=1.0))
    x_ticks = nice_ticks(min(epochs, default=0), max(epochs, default=1), count=6)
    x_ticks = [t for t in x_ticks if t == int(t)] or x_ticks  # epochs are whole numbers

    def to_pixel(epoch: float, value: float) -> tuple[float, float]:
        fx = (epoch - x_ticks[0]) / ((x_ticks[-1] - x_ticks[0]) or 1)
        fy = (value - y_ticks[0]) / ((y_ticks[-1] - y_ticks[0]) or 1)
        return x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)

    for tick in y_ticks:
        _, y = to_pixel(x_ticks[0], tick)
        draw.line([(x0, y), (x1, y)], fill=GRID)
        draw.text((x0 - 6, y), tick_label(tick), fill=TEXT, font=font, anchor="rm")
    for tick in x_ticks:
        x, _ = to_pixel(tick, y_ticks[0])
        draw.line([(x, y1), (x, y1 + 4)], fill=AXES)
        draw.text((x, y1 + 6), tick_label(tick), fill=TEXT, font=font, anchor="mt")
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=AXES, width=1)
    draw.text(((x0 + x1) / 2, 12), title, fill=TEXT, font=font, anchor="mt")
    draw.text(((x0 + x1) / 2, HEIGHT - 14), "epoch", fill=TEXT, font=font, anchor="mb")
    _vertical_text(image, y_label, (left + 14, (y0 + y1) // 2), font)

    for index, (name, points) in enumerate(series.items()):
        colour = COLOURS.get(name, AXES)
        pixels = [to_pixel(e, v) for e, v in zip(epochs, points, strict=True) if math.isfinite(v)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for x, y in pixels:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        legend_y = y0 + 8 + 16 * index
        draw.line([(x1 - 110, legend_y), (x1 - 90, legend_y)], fill=colour, width=2)
        draw.text((x1 - 84, legend_y), name, fill=TEXT, font=font, anchor="lm")


def _vertical_text(image: Image.Image, text: str, centre: tuple[int, int], font) -> None:
    """Paste `text` rotated a quarter turn anticlockwise, centred on `centre`."""
    left, top, right, bottom = font.getbbox(text)
    label = Image.new("RGBA", (right - left + 4, bottom - top + 4), (0, 0, 0, 0))
    ImageDraw.Draw(label).text((2 - left, 2 - top), text, fill=TEXT, font=font)
    label = label.rotate(90, expand=True)
    image.paste(label, (centre[0] - label.width // 2, centre[1] - label.height // 2), label)


def draw_curves(history: Sequence[Mapping[str, float]], path: str | Path) -> None:
    """Write the curves of log.csv's rows (epoch, train_loss, test_loss, test_top1) to `path`."""
    image = Image.new("RGB", (2 * PANEL_WIDTH, HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    epochs = [row["epoch"] for row in history]
    losses = {
        "train loss": [row["train_loss"] for row in history],
        "test loss": [row["test_loss"] for row in history],
    }
    accuracy = {"test top-1": [row["test_top1"] for row in history]}
    _panel(draw, image, 0, "loss", "loss", epochs, losses, font)
    _panel(draw, image, PANEL_WIDTH, "test accuracy", "top-1 (%)", epochs, accuracy, font)
    image.save(path)

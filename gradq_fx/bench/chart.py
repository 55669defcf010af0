"""`bench.png` and `kernels.png`: horizontal bar charts drawn with Pillow alone, ticks and
colours shared with the training curves (`gradq_fx.train.plot`); one bar per step setting
(median, q1-q3 whiskers) or per GEMM candidate and shape (TOP/s).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from gradq_fx.bench.kernels import KernelReport
from gradq_fx.bench.step import StepReport
from gradq_fx.train.plot import AXES, BACKGROUND, COLOURS, GRID, TEXT, nice_ticks, tick_label

CHART_WIDTH, LABEL_WIDTH, VALUE_WIDTH = 900, 260, 150
ROW_HEIGHT, CHART_TOP, CHART_BOTTOM = 22, 56, 48
PALETTE = (*COLOURS.values(), (214, 39, 40), (148, 103, 189), (140, 86, 75), (227, 119, 194))


@dataclasses.dataclass(frozen=True)
class Bar:
    """One bar: its label (left), length, optional whisker (low, high), colour group, and the
    text written after it."""

    label: str
    value: float
    group: str
    text: str
    whisker: tuple[float, float] | None = None


def chart_size(bars: int) -> tuple[int, int]:
    """The (width, height) in pixels of a chart of that many bars."""
    return CHART_WIDTH, CHART_TOP + bars * ROW_HEIGHT + CHART_BOTTOM


def _fit(text: str, width: float, font) -> str:
    while text and font.getlength(text) > width:
        text = text[:-4] + "..."
    return text


def draw_bars(path: Path, title: str, axis_label: str, bars: Sequence[Bar], legend: bool) -> None:
    """A horizontal bar chart: one row per bar, x axis from 0 with round ticks."""
    image = Image.new("RGB", chart_size(len(bars)), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    x0, x1 = LABEL_WIDTH, CHART_WIDTH - VALUE_WIDTH
    y0, y1 = CHART_TOP, CHART_TOP + len(bars) * ROW_HEIGHT
    top = max([b.whisker[1] if b.whisker else b.value for b in bars], default=1.0)
    ticks = nice_ticks(0.0, top or 1.0)
    scale = (x1 - x0) / ticks[-1]
    groups = list(dict.fromkeys(b.group for b in bars))
    colours = {group: PALETTE[i % len(PALETTE)] for i, group in enumerate(groups)}

    draw.text((CHART_WIDTH / 2, 10), title, fill=TEXT, font=font, anchor="mt")
    for tick in ticks:
        x = x0 + tick * scale
        draw.line([(x, y0), (x, y1)], fill=GRID)
        draw.text((x, y1 + 6), tick_label(tick), fill=TEXT, font=font, anchor="mt")
    draw.text(((x0 + x1) / 2, y1 + 26), axis_label, fill=TEXT, font=font, anchor="mt")
    for index, bar in enumerate(bars):
        y = y0 + index * ROW_HEIGHT
        middle = y + ROW_HEIGHT / 2
        end = x0 + bar.value * scale
        draw.rectangle([x0, y + 4, end, y + ROW_HEIGHT - 4], fill=colours[bar.group])
        if bar.whisker is not None:
            low, high = (x0 + v * scale for v in bar.whisker)
            draw.line([(low, middle), (high, middle)], fill=AXES)
            for x in (low, high):
                draw.line([(x, middle - 4), (x, middle + 4)], fill=AXES)
            end = max(end, high)
        label = _fit(bar.label, LABEL_WIDTH - 12, font)
        draw.text((x0 - 6, middle), label, fill=TEXT, font=font, anchor="rm")
        draw.text((end + 4, middle), bar.text, fill=TEXT, font=font, anchor="lm")
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill=AXES)
    if legend:
        x = 10
        for group in groups:
            draw.rectangle([x, 30, x + 12, 42], fill=colours[group])
            draw.text((x + 16, 36), group, fill=TEXT, font=font, anchor="lm")
            x += 28 + font.getlength(group)
    image.save(path)


def step_bars(report: StepReport) -> list[Bar]:
    return [
        Bar(name, r.ms.median, name, f"{r.ms.median:.2f} ms", (r.ms.q1, r.ms.q3))
        for name, r in report.results.items()
        if r.ms is not None
    ]


def kernel_bars(report: KernelReport) -> list[Bar]:
    bars, previous = [], None
    for t in report.gemms:
        if t.tops is None:
            continue
        shape = f"{t.name} {t.role}"
        percent = "" if t.percent_of_peak is None else f" ({t.percent_of_peak:.0f}% peak)"
        label = shape if shape != previous else ""
        bars.append(Bar(label, t.tops, t.candidate, f"{t.tops:.3g}{percent}"))
        previous = shape
    return bars

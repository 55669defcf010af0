"""`gradq_fx.bench.chart`: the bar chart's size."""

from __future__ import annotations

from PIL import Image

from gradq_fx.bench.chart import Bar, chart_size, draw_bars


def test_bar_chart_has_the_documented_size(tmp_path):
    bars = [
        Bar("fp32-eager", 12.0, "fp32-eager", "12 ms", (11.0, 13.0)),
        Bar("a label far too long to fit in the label column " * 2, 3.0, "gradq", "3 ms"),
    ]
    path = tmp_path / "chart.png"
    draw_bars(path, "title", "ms", bars, legend=True)
    with Image.open(path) as image:
        assert image.size == chart_size(2)

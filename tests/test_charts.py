from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest

from django_leakguard.reporting import charts

SVG = "{http://www.w3.org/2000/svg}"


def parse(markup: str) -> ET.Element:
    return ET.fromstring(markup)


def test_scale_maps_ends_and_middle() -> None:
    assert charts.scale(0, 0, 10, 100, 200) == 100
    assert charts.scale(10, 0, 10, 100, 200) == 200
    assert charts.scale(5, 0, 10, 200, 100) == 150  # reversed: y grows downwards


def test_scale_of_a_flat_range_is_the_middle() -> None:
    assert charts.scale(7, 7, 7, 0, 50) == 25


def test_sparkline_plots_every_value_and_keeps_them() -> None:
    svg = parse(charts.sparkline([0, 10, -5], "a <b> & c", width=100, height=20))
    assert svg.get("data-values") == "0 10 -5"
    assert svg.findtext(f"{SVG}title") == "a <b> & c"
    points = svg.find(f"{SVG}polyline").get("points").split()  # type: ignore[union-attr]
    assert [point.split(",")[0] for point in points] == ["2", "50", "98"]
    ys = [float(point.split(",")[1]) for point in points]
    assert ys[1] == 2  # the largest value at the top
    assert ys[2] == 18  # the smallest at the bottom


def test_sparkline_escapes_its_title() -> None:
    markup = charts.sparkline([1], '"><script>alert(1)</script>')
    assert "<script>" not in markup
    assert "&lt;script&gt;" in markup


def test_sparkline_of_nothing_says_so() -> None:
    svg = parse(charts.sparkline([], "empty"))
    assert svg.findtext(f"{SVG}text") == "no data"


def test_sparkline_of_zeros_is_centred() -> None:
    svg = parse(charts.sparkline([0], "one", width=100, height=20))
    assert svg.find(f"{SVG}polyline").get("points") == "2,10"  # type: ignore[union-attr]


def line(**kwargs: object) -> ET.Element:
    options: dict[str, object] = {"x_format": lambda x: f"x{x:g}", "y_format": lambda y: f"{y:g}B"}
    options.update(kwargs)
    series = options.pop("series", [charts.Series("s", [(0, 0), (10, 100)])])
    return parse(charts.line_chart("T <1>", series, **options))  # type: ignore[arg-type]


def test_line_chart_labels_its_axes_and_points() -> None:
    svg = line()
    assert svg.findtext(f"{SVG}title") == "T <1>"
    texts = [text.text for text in svg.iter(f"{SVG}text")]
    assert texts == ["100B", "0B", "x0", "x10"]
    circles = list(svg.iter(f"{SVG}circle"))
    assert [(c.get("data-x"), c.get("data-y")) for c in circles] == [("0", "0"), ("10", "100")]
    assert circles[1].findtext(f"{SVG}title") == "s, x10: 100B"


def test_line_chart_includes_zero_and_labels_it_when_values_cross_it() -> None:
    svg = line(series=[charts.Series("s", [(0, -50), (1, 50)])])
    assert [text.text for text in svg.iter(f"{SVG}text")][:3] == ["50B", "-50B", "0B"]


def test_line_chart_keeps_fractions_exact() -> None:
    svg = line(series=[charts.Series("s", [(0, 1.5), (1, 2.0)])])
    assert [c.get("data-y") for c in svg.iter(f"{SVG}circle")] == ["1.5", "2"]


def test_bar_chart_draws_rects() -> None:
    svg = line(bars=True, series=[charts.Series("calls", [(0, 3), (1, 0), (2, 7)])])
    rects = list(svg.iter(f"{SVG}rect"))
    assert [r.get("data-y") for r in rects] == ["3", "0", "7"]
    assert all(float(r.get("height", "0")) > 0 for r in rects)  # zero still shows a line
    assert rects[2].findtext(f"{SVG}title") == "x2: 7B"


def test_series_differ_by_dash_and_have_a_legend() -> None:
    series = [charts.Series(f"w{n}", [(0, n), (1, n + 1)]) for n in range(3)]
    svg = line(series=series)
    dashes = [p.get("stroke-dasharray") for p in svg.iter(f"{SVG}polyline")]
    assert dashes == [None, "6 3", "2 3"]
    legend = [g for g in svg.iter(f"{SVG}g") if g.get("class") == "leakguard-legend"]
    assert [t.text for t in legend[0].iter(f"{SVG}text")] == ["w0", "w1", "w2"]


def test_many_series_go_without_a_legend() -> None:
    series = [charts.Series(f"w{n}", [(0, n)]) for n in range(charts.LEGEND_MAX + 1)]
    svg = line(series=series)
    assert not [g for g in svg.iter(f"{SVG}g") if g.get("class") == "leakguard-legend"]


@pytest.mark.parametrize("series", [[], [charts.Series("s", [])]])
def test_line_chart_without_points_says_so(series: list[charts.Series]) -> None:
    svg = line(series=series)
    assert svg.findtext(f"{SVG}text") == "No readings in this window."


def test_labels_and_series_names_are_escaped() -> None:
    markup = charts.line_chart(
        "t",
        [charts.Series('<img src=x onerror="1">', [(0, 1)])],
        x_format=lambda x: "<x>",
        y_format=lambda y: "&",
    )
    assert "<img" not in markup
    assert "<x>" not in markup
    parse(markup)  # well-formed


def test_no_inline_style_and_no_script() -> None:
    markup = charts.line_chart(
        "t", [charts.Series("s", [(0, 1), (1, 2)])], x_format=str, y_format=str, bars=True
    ) + charts.sparkline([1, 2], "s")
    assert not re.search(r"\bstyle\b|<script|\bon\w+=", markup)


def test_one_x_has_one_centred_label_and_a_narrow_bar() -> None:
    svg = line(bars=True, series=[charts.Series("calls", [(5, 3)])])
    labels = [t for t in svg.iter(f"{SVG}text") if t.get("text-anchor") == "middle"]
    assert [t.text for t in labels] == ["x5"]
    assert float(next(svg.iter(f"{SVG}rect")).get("width", "0")) == charts.BAR_MAX


def test_levels_leave_zero_out_when_asked() -> None:
    svg = line(include_zero=False, series=[charts.Series("rss", [(0, 50), (1, 60)])])
    assert [t.text for t in svg.iter(f"{SVG}text")][:2] == ["60B", "50B"]
    axis = next(svg.iter(f"{SVG}line"))
    assert axis.get("y1") == "186"  # the x axis at the bottom, where 50 is

"""Server-side SVG plots (pygal), inlined in the pages: no script, no network.

pygal's default config links a tooltip script from a CDN; `_config` empties that list and
`_render` drops pygal's inline config script, so a page works offline under a strict content
security policy (the SVG keeps its `<desc>` values for hover-free reading). Each plot has a table
beside it on its page with the same numbers: the plot is a picture of the table.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Iterable

import pygal
from markupsafe import Markup
from pygal.style import Style

STYLE = Style(background="transparent", plot_background="#ffffff", foreground="#1f2933",
              foreground_strong="#111827", foreground_subtle="#52606d",
              colors=("#1d4ed8", "#b45309", "#047857", "#7c3aed", "#be123c", "#0e7490",
                      "#4d7c0f"),
              font_family="system-ui, sans-serif", label_font_size=12,
              major_label_font_size=12, legend_font_size=12, title_font_size=14)


def _config(chart: pygal.graph.graph.Graph, title: str) -> None:
    chart.config.js = []  # no CDN script: the page works offline
    chart.config.disable_xml_declaration = True
    chart.config.title = title
    chart.config.style = STYLE
    chart.config.width, chart.config.height = 880, 320
    chart.config.legend_at_bottom = True
    chart.config.no_data_text = "nothing in this period"
    chart.config.explicit_size = False  # scales with its container (CSS)


_SCRIPT = re.compile(r"<script\b.*?</script>", re.S)


def _render(chart: pygal.graph.graph.Graph, label: str) -> Markup:
    # pygal's inline script only configures its (absent) tooltip library; the pages' content
    # security policy allows no inline script, so it goes.
    svg = _SCRIPT.sub("", chart.render(is_unicode=True))
    return Markup(f'<figure class="plot" role="group" aria-label="{label}">{svg}</figure>')


def steps_over_time(title: str, series: dict[str, list[tuple[datetime, float]]],
                    y_title: str) -> Markup:
    """A step line per series of (time, value) points, values held until the next point."""
    chart = pygal.DateTimeLine(x_label_rotation=20, show_dots=True, dots_size=2,
                               x_value_formatter=lambda t: t.strftime("%m-%d %H:%M"),
                               interpolate=None, y_title=y_title, truncate_legend=40)
    _config(chart, title)
    for name, points in series.items():
        chart.add(name, _stepped(points))
    return _render(chart, title)


def _stepped(points: Iterable[tuple[datetime, float]]) -> list[tuple[datetime, float]]:
    out: list[tuple[datetime, float]] = []
    for moment, value in points:
        if out:
            out.append((moment, out[-1][1]))
        out.append((moment, value))
    return out


def stacked_bars(title: str, labels: list[str], parts: dict[str, list[int]],
                 y_title: str) -> Markup:
    """One horizontal bar per label, split into `parts` (name → one value per label)."""
    chart = pygal.HorizontalStackedBar(y_title=y_title, truncate_label=40)
    _config(chart, title)
    chart.config.height = max(240, 140 + 40 * len(labels))
    chart.x_labels = labels
    for name, values in parts.items():
        chart.add(name, values)
    return _render(chart, title)

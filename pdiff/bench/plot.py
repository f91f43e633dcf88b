"""Line charts as PNG with Pillow alone (pdiff depends on no plotting library): panels side by
side, each with axes, ticks, grid, one line with markers per series, a legend and optional
vertical marks (a crossover)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


@dataclass
class Series:
    label: str
    xs: list[float]
    ys: list[float]


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series]
    marks: list[tuple[float, str]] = field(default_factory=list)   # vertical dashed lines at x, labelled


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t < hi + step * 0.999:
        ticks.append(round(t, 12))
        t += step
    return ticks


def tick_label(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.3g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")
    return f"{v:.4g}"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:            # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _dashed_vline(draw, x: float, y0: float, y1: float, fill, dash: int = 6) -> None:
    y = y0
    while y < y1:
        draw.line([(x, y), (x, min(y + dash, y1))], fill=fill, width=1)
        y += 2 * dash


def draw_panel(draw, box: tuple[int, int, int, int], panel: Panel, fonts) -> None:
    font, small = fonts
    left, top, right, bottom = box
    x0, y0, x1, y1 = left + 70, top + 44, right - 16, bottom - 52      # the plotting area
    xs = [x for s in panel.series for x in s.xs] + [m[0] for m in panel.marks]
    ys = [y for s in panel.series for y in s.ys]
    xt = nice_ticks(min(xs, default=0.0), max(xs, default=1.0))
    yt = nice_ticks(min(ys, default=0.0), max(ys, default=1.0))
    xmin, xmax, ymin, ymax = xt[0], xt[-1], yt[0], yt[-1]

    def px(x):
        return x0 + (x - xmin) / (xmax - xmin or 1) * (x1 - x0)

    def py(y):
        return y1 - (y - ymin) / (ymax - ymin or 1) * (y1 - y0)
    draw.text(((left + right) / 2, top + 6), panel.title, fill="black", font=font, anchor="mt")
    for t in xt:
        draw.line([(px(t), y0), (px(t), y1)], fill=(230, 230, 230))
        draw.text((px(t), y1 + 6), tick_label(t), fill="black", font=small, anchor="mt")
    for t in yt:
        draw.line([(x0, py(t)), (x1, py(t))], fill=(230, 230, 230))
        draw.text((x0 - 6, py(t)), tick_label(t), fill="black", font=small, anchor="rm")
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text(((x0 + x1) / 2, bottom - 20), panel.xlabel, fill="black", font=small, anchor="mt")
    draw.text((x0, y0 - 4), panel.ylabel, fill="black", font=small, anchor="lb")     # above the axis
    for i, (x, label) in enumerate(panel.marks):      # labels at the foot, stepped so that close marks stay legible
        _dashed_vline(draw, px(x), y0, y1, (90, 90, 90))
        draw.text((px(x) + 4, y1 - 4 - 15 * (i % 4)), label, fill=(60, 60, 60), font=small, anchor="lb")
    for i, s in enumerate(panel.series):
        colour = COLOURS[i % len(COLOURS)]
        pts = [(px(x), py(y)) for x, y in zip(s.xs, s.ys)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for x, y in pts:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    # legend, top right inside the plotting area
    if panel.series:
        widths = [draw.textlength(s.label, font=small) for s in panel.series]
        w, h = max(widths) + 34, 16 * len(panel.series) + 8
        lx, ly = x1 - w - 6, y0 + 6
        draw.rectangle([lx, ly, lx + w, ly + h], fill="white", outline=(160, 160, 160))
        for i, s in enumerate(panel.series):
            colour = COLOURS[i % len(COLOURS)]
            yy = ly + 12 + 16 * i
            draw.line([(lx + 6, yy), (lx + 24, yy)], fill=colour, width=2)
            draw.text((lx + 28, yy), s.label, fill="black", font=small, anchor="lm")


def save_chart(path: str | Path, panels: list[Panel], title: str = "", note: str = "",
               panel_size: tuple[int, int] = (620, 440)) -> Path:
    """The panels side by side under ``title`` with ``note`` (small print) at the bottom."""
    w, h = panel_size
    head, foot = (30 if title else 0), (22 if note else 0)
    img = Image.new("RGB", (w * len(panels), h + head + foot), "white")
    draw = ImageDraw.Draw(img)
    fonts = (_font(15), _font(12))
    if title:
        draw.text((img.width / 2, 8), title, fill="black", font=fonts[0], anchor="mt")
    for i, panel in enumerate(panels):
        draw_panel(draw, (i * w, head, (i + 1) * w, head + h), panel, fonts)
    if note:
        draw.text((8, head + h + 4), note, fill=(80, 80, 80), font=fonts[1], anchor="lt")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
    return path

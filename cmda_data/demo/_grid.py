"""Figures of mixed samples: the PNG grid and table of ``cmda demo`` (private).

Two renderers, both written with matplotlib's object-oriented API (``Figure`` +
``FigureCanvasAgg``), so the user's pyplot backend and global state are never touched:

* :func:`render_mix_grid`: one row per generated sample: the mixed image (left) under the
  teacher caption that guided it, then its top partners as small thumbnails, each with its
  weight (a number and a bar) and caption.
* :func:`render_mix_table`: the same facts when the student is not a picture (feature
  vectors): the guiding sample's class and text, then the partners' classes and weights.

matplotlib is imported when a figure is drawn; without it a
:class:`~cmda_data.exceptions.MissingDependencyError` names ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import textwrap
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..core._validation import fail
from ..exceptions import MissingDependencyError

__all__ = ["GridRow", "Partner", "TableRow", "find_cjk_font", "load_matplotlib", "render_mix_grid",
           "render_mix_table", "to_rgb"]

INSTALL_HINT = "pip install -e '.[bench]'"
_CJK_PROBE = "\u4e2d\u6587"  # two common Chinese characters
_SAME = "#1b7f3b"   # partner agrees with the guiding sample (class / shape)
_OTHER = "#666666"  # partner differs


@dataclass
class Partner:
    """One partner of a generated sample: its thumbnail (or None), weight and caption."""

    weight: float
    caption: str
    image: Any = None
    same: Optional[bool] = None  # agrees with the guiding sample (drawn green) or not (grey)


@dataclass
class GridRow:
    """One generated sample: the mixed image, the guiding caption and the partners."""

    image: Any
    title: str
    partners: List[Partner] = field(default_factory=list)


@dataclass
class TableRow:
    """One generated feature vector: the guiding sample in words and the partners."""

    guide: str
    detail: str
    partners: List[Partner] = field(default_factory=list)


def load_matplotlib() -> Tuple[Any, Any]:
    """``(Figure, FigureCanvasAgg)``, or :class:`MissingDependencyError` naming the extra."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        fail("matplotlib", f"the optional dependency matplotlib to draw figures ({INSTALL_HINT})",
             repr(error), MissingDependencyError, raw=True)
    return Figure, FigureCanvasAgg


def find_cjk_font() -> Optional[str]:
    """The file of an installed font that can draw Chinese text, or None.

    Checks the glyphs themselves among the fonts matplotlib knows, skipping "Last Resort"
    fonts (they cover every code point with placeholder boxes).
    """
    load_matplotlib()
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    for entry in font_manager.fontManager.ttflist:
        if "last resort" in entry.name.lower():  # maps every code point to a placeholder box
            continue
        try:
            charmap = FT2Font(entry.fname).get_charmap()
        except (OSError, RuntimeError, ValueError):  # unreadable font file: skip it
            continue
        if all(ord(c) in charmap for c in _CJK_PROBE):
            return entry.fname
    return None


def to_rgb(image: Any) -> np.ndarray:
    """A ``[H, W, 3]`` float array in [0, 1] from a ``[3, H, W]`` / ``[H, W, 3]`` tensor or array.

    Examples:
        >>> to_rgb(np.zeros((3, 4, 5))).shape
        (4, 5, 3)
    """
    array = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image, dtype=float)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3:
        fail("image", "a [3, H, W] or [H, W, 3] picture", image)
    if array.shape[0] in (1, 3) and array.shape[2] not in (1, 3):
        array = np.transpose(array, (1, 2, 0))
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.clip(array, 0.0, 1.0)


def _save(figure: Any, canvas_type: Any, path: Union[str, Path], dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas_type(figure)
    figure.savefig(str(path), dpi=dpi, facecolor="white")
    return path


def _wrap(text: str, width: int, lines: int) -> str:
    """``text`` wrapped to ``width`` columns, at most ``lines`` lines (the last one cut with "...").

    Wide characters (Chinese, Japanese, Korean) take about two columns, so text that has
    them wraps at half the width.

    Examples:
        >>> print(_wrap("a red circle at the top left", 12, 2))
        a red circle
        at the...
    """
    text = " ".join(text.split())
    if any(unicodedata.east_asian_width(c) in "WF" for c in text):
        width = max(4, width // 2)
    wrapped = textwrap.wrap(text, width=width) or [""]
    if len(wrapped) > lines:
        rest = " ".join(wrapped[lines - 1:])
        last = textwrap.shorten(rest, width=width, placeholder="...")  # cut at a word boundary
        if last == "...":  # the first word alone is too long
            last = rest[: max(1, width - 3)].rstrip() + "..."
        wrapped = wrapped[:lines - 1] + [last]
    return "\n".join(wrapped)


def _title_lines(title: str, width: float) -> Tuple[str, str]:
    """The title's first line (bold) and the rest (a subtitle), wrapped to the figure width."""
    head, _, rest = title.partition("\n")
    head = textwrap.fill(" ".join(head.split()), width=max(20, int(width * 6.8)))
    rest = textwrap.fill(" ".join(rest.split()), width=max(20, int(width * 8.6))) if rest.strip() else ""
    return head, rest


def _title_height(title: str, width: float) -> float:
    head, rest = _title_lines(title, width)
    return 0.3 * (head.count("\n") + 1) + (0.25 * (rest.count("\n") + 1) + 0.1 if rest else 0.0)


def _draw_title(figure: Any, title: str, width: float, height: float) -> None:
    head, rest = _title_lines(title, width)
    figure.text(0.5, 1 - 0.15 / height, head, ha="center", va="top", fontsize=14, weight="bold")
    if rest:
        top = 0.15 + 0.3 * (head.count("\n") + 1) + 0.1
        figure.text(0.5, 1 - top / height, rest, ha="center", va="top", fontsize=12, color="#222222")


def _colour(partner: Partner) -> str:
    return "black" if partner.same is None else (_SAME if partner.same else _OTHER)


def render_mix_grid(rows: Sequence[GridRow], path: Union[str, Path], *, title: str, footnote: str = "",
                    font_file: Optional[str] = None, dpi: int = 100) -> Path:
    """Draw the generated images with their guiding captions and partners; write a PNG.

    Args:
        rows: the generated samples (all with the same number of partners, at most 8).
        path: the PNG file to write (folders are created).
        title: the figure title (one or two lines).
        footnote: a small line under the grid (what green / grey mean, font notes).
        font_file: a font file for captions (e.g. a CJK font), None for the default.
        dpi: resolution.
    """
    Figure, canvas_type = load_matplotlib()
    from matplotlib.font_manager import FontProperties
    from matplotlib.patches import Rectangle

    if not rows:
        fail("rows", "at least one generated sample to draw", rows)
    k = max(len(r.partners) for r in rows)
    props = {} if font_file is None else {"fontproperties": FontProperties(fname=font_file)}
    # inches; the text sizes are chosen to stay legible with the PNG shown about 750-900 px wide
    thumb, big, gap, row_h = 1.5, 2.0, 0.4, 3.3
    width = 0.25 + big + 0.5 + max(k, 1) * (thumb + gap) + 0.1
    header, footer = 0.35, 0.6 if footnote else 0.15
    header += _title_height(title, width)
    height = header + len(rows) * row_h + footer
    figure = Figure(figsize=(width, height))
    _draw_title(figure, title, width, height)

    def axes(left: float, top: float, w: float, h: float) -> Any:  # inches from the top-left corner
        ax = figure.add_axes((left / width, 1 - (top + h) / height, w / width, h / height))
        ax.set_xticks([])
        ax.set_yticks([])
        return ax

    for r, row in enumerate(rows):
        top = header + r * row_h
        figure.text(0.25 / width, 1 - (top + 0.05) / height, _wrap(f"guided by: \u201c{row.title}\u201d", 70, 1),
                    ha="left", va="top", fontsize=13, weight="bold", **props)
        ax = axes(0.25, top + 0.55, big, big)
        ax.imshow(to_rgb(row.image), interpolation="nearest")
        ax.set_xlabel("generated (mix)", fontsize=11.5, labelpad=5)
        for spine in ax.spines.values():
            spine.set_edgecolor("#1f4e9c")
            spine.set_linewidth(2.5)
        for c, partner in enumerate(row.partners):
            left = 0.25 + big + 0.5 + gap / 2 + c * (thumb + gap)
            ax = axes(left, top + 0.95, thumb, thumb)
            if partner.image is not None:
                ax.imshow(to_rgb(partner.image), interpolation="nearest")
            # the weight, as a number and as a bar (full bar: weight 1)
            weight = min(max(float(partner.weight), 0.0), 1.0)
            ax.add_patch(Rectangle((0, 1.035), 1, 0.06, transform=ax.transAxes, clip_on=False,
                                   facecolor="#dde3ee", edgecolor="none"))
            ax.add_patch(Rectangle((0, 1.035), weight, 0.06, transform=ax.transAxes, clip_on=False,
                                   facecolor="#1f4e9c", edgecolor="none"))
            ax.text(0.5, 1.12, f"w = {partner.weight:.3f}", transform=ax.transAxes, ha="center", va="bottom",
                    fontsize=13, weight="bold")
            ax.text(0.5, -0.05, _wrap(partner.caption, 20, 3), transform=ax.transAxes, ha="center", va="top",
                    fontsize=11, linespacing=1.15, color=_colour(partner), **props)
    if footnote:
        figure.text(0.5, 0.15 / height, footnote, ha="center", va="bottom", fontsize=11.5, color="#333333")
    return _save(figure, canvas_type, path, dpi)


def render_mix_table(rows: Sequence[TableRow], path: Union[str, Path], *, title: str, footnote: str = "",
                     dpi: int = 100) -> Path:
    """Draw a table: guiding sample (class and text) -> partners (class and weight); write a PNG.

    For students that are feature vectors (nothing to look at): each row says which
    sample guided the generated vector and which samples it mixes, with what weights.
    """
    Figure, canvas_type = load_matplotlib()
    if not rows:
        fail("rows", "at least one generated sample to draw", rows)
    k = max(len(r.partners) for r in rows)
    guide_w, cell_w, row_h = 4.2, 1.55, 0.95     # inches
    width = 0.3 + guide_w + k * cell_w + 0.3
    header, footer = 0.65, 0.45 if footnote else 0.15
    header += _title_height(title, width)
    height = header + len(rows) * row_h + footer
    figure = Figure(figsize=(width, height))
    _draw_title(figure, title, width, height)

    def at(x: float, y: float) -> Tuple[float, float]:  # inches from the top-left corner
        return x / width, 1 - y / height

    figure.text(*at(0.3, header - 0.3), "guiding sample (teacher)", fontsize=9.5, weight="bold", va="bottom")
    for c in range(k):
        figure.text(*at(0.3 + guide_w + c * cell_w, header - 0.3), f"partner {c + 1}", fontsize=9.5,
                    weight="bold", va="bottom")
    for r, row in enumerate(rows):
        top = header + r * row_h
        if r % 2 == 0:
            band = figure.add_axes((0.15 / width, 1 - (top + row_h - 0.08) / height, (width - 0.3) / width,
                                    (row_h - 0.04) / height), zorder=-1)
            band.set_facecolor("#f2f4f7")
            band.set_xticks([])
            band.set_yticks([])
            for spine in band.spines.values():
                spine.set_visible(False)
        figure.text(*at(0.3, top + 0.08), _wrap(row.guide, 48, 1), fontsize=9.5, weight="bold", va="top")
        figure.text(*at(0.3, top + 0.34), _wrap(row.detail, 62, 2), fontsize=7.5, va="top", color="#333333")
        for c, partner in enumerate(row.partners):
            x = 0.3 + guide_w + c * cell_w
            figure.text(*at(x, top + 0.08), _wrap(partner.caption, 18, 2), fontsize=8.5, va="top",
                        color=_colour(partner))
            figure.text(*at(x, top + 0.52), f"w = {partner.weight:.3f}", fontsize=8.5, va="top")
    if footnote:
        figure.text(0.5, 0.12 / height, footnote, ha="center", va="bottom", fontsize=8.5, color="#333333")
    return _save(figure, canvas_type, path, dpi)

"""PNG plots of eval metrics: matplotlib's Agg backend (no display needed), a CJK font when the
system has one so Chinese titles and labels render (Debian/Ubuntu: apt-get install fonts-noto-cjk),
and one warning naming the fix when it has none.

matplotlib reads its font list from a cache (fontlist-v*.json in its cache directory) written the
first time it ran; a font installed after that (apt-get install fonts-noto-cjk, as the README
says) is on disk but not in the list, and Chinese shows as boxes. So a CJK font file on disk that
the list lacks means the cache is stale: the fonts missing from it are added (FontManager.addfont)
and the cache is written again, once, with one line saying so; where that fails, the warning gives
the one command that rebuilds it."""

from __future__ import annotations

import math
import os
import re
from typing import Sequence

from absl import logging

_CJK_FAMILIES = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Serif CJK SC", "Source Han Sans SC",
                 "WenQuanYi Zen Hei", "WenQuanYi Micro Hei", "SimHei", "Microsoft YaHei",
                 "PingFang SC", "Heiti SC", "AR PL UMing CN")
_CJK_RE = re.compile(r"[\u3400-\u9fff]")
# Font files of the families above (fonts-noto-cjk, fonts-wqy-*, fonts-arphic-uming, Windows and
# macOS fonts copied in), by file name.
_CJK_FILE_RE = re.compile(r"(NotoSansCJK|NotoSerifCJK|SourceHanSans|SourceHanSerif|wqy-zenhei|"
                          r"wqy-microhei|simhei|msyh|PingFang|STHeiti|uming)", re.IGNORECASE)
_state: dict = {}


def pyplot():
  """matplotlib.pyplot on the Agg backend, with a CJK-capable sans-serif font first if found."""
  if "plt" not in _state:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    from matplotlib import font_manager  # pylint: disable=g-import-not-at-top
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    refresh_stale_font_cache()
    installed = {f.name for f in font_manager.fontManager.ttflist}
    cjk = next((f for f in _CJK_FAMILIES if f in installed), None)
    if cjk:
      matplotlib.rcParams["font.sans-serif"] = [cjk, "DejaVu Sans"]
      matplotlib.rcParams["font.family"] = "sans-serif"
    matplotlib.rcParams["axes.unicode_minus"] = False  # CJK fonts often lack U+2212
    _state.update(plt=plt, cjk=cjk)
  return _state["plt"]


def missing_cjk_files() -> list[str]:
  """CJK font files on disk that matplotlib's font list (read from its cache) does not have."""
  from matplotlib import font_manager  # pylint: disable=g-import-not-at-top
  known = {f.fname for f in font_manager.fontManager.ttflist}
  return sorted(f for f in font_manager.findSystemFonts()
                if _CJK_FILE_RE.search(os.path.basename(f)) and f not in known)


def _cache_path() -> str:
  """matplotlib's font-list cache file (where matplotlib.font_manager._load_fontmanager keeps it)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  from matplotlib import font_manager  # pylint: disable=g-import-not-at-top
  return os.path.join(matplotlib.get_cachedir(),
                      f"fontlist-v{font_manager.FontManager.__version__}.json")


def refresh_stale_font_cache() -> list[str]:
  """Adds the fonts installed since matplotlib's font cache was written, when a CJK one is among
  them, and writes the cache again. Returns the CJK files added ([] when the cache was fresh)."""
  from matplotlib import font_manager  # pylint: disable=g-import-not-at-top
  missing = missing_cjk_files()
  if not missing:
    return []
  fm = font_manager.fontManager
  known = {f.fname for f in fm.ttflist}
  try:
    for path in font_manager.findSystemFonts():
      if path not in known:
        try:
          fm.addfont(path)
        except (OSError, RuntimeError, ValueError):  # an unreadable font file: matplotlib skips those too
          if path in missing:
            raise
    font_manager.json_dump(fm, _cache_path())
  except Exception as e:  # pylint: disable=broad-except  # the plots still render, with boxes
    logging.warning("matplotlib's font cache predates the CJK font %s and could not be "
                    "rebuilt (%s: %s): Chinese in the plots shows as boxes until you run: "
                    "rm -rf %s", missing[0], type(e).__name__, e,
                    os.path.dirname(_cache_path()))
    return []
  logging.info("matplotlib's font cache predated %s: added it and rewrote %s",
               ", ".join(os.path.basename(m) for m in missing), _cache_path())
  return missing


def cjk_font() -> str | None:
  pyplot()
  return _state["cjk"]


def warn_if_cjk(texts: Sequence[str]) -> None:
  if cjk_font() is None and any(_CJK_RE.search(t or "") for t in texts) and not _state.get("warned"):
    _state["warned"] = True
    logging.warning("no CJK font found: Chinese labels in the plots will show as boxes; install "
                    "one (Debian/Ubuntu: apt-get install fonts-noto-cjk)")


def panel_grid(n: int, width: float = 3.6, height: float = 2.6):
  """(figure, the first n axes) of a grid of small panels, at most 3 a row; the rest are hidden."""
  cols = min(max(n, 1), 3)
  rows = math.ceil(max(n, 1) / cols)
  fig, axes = pyplot().subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  return fig, list(axes.flat)[:n]


def style_panel(ax, name: str, xlabel: str = "step") -> None:
  ax.set_title(name, fontsize=9)
  ax.set_xlabel(xlabel, fontsize=8)
  ax.tick_params(labelsize=7)
  ax.grid(alpha=0.3)


def save(fig, path: str, title: str = "", suptitle: bool = True, layout: bool = True) -> str:
  """Titles, lays out (unless the caller did: `layout`=False), writes `path` (PNG) and closes the
  figure; returns the path."""
  if title:
    (fig.suptitle if suptitle else fig.axes[0].set_title)(title, fontsize=10)
  if layout:
    fig.tight_layout()
  fig.savefig(path, dpi=90)
  pyplot().close(fig)
  return path


def bars(labels: Sequence[str], series: dict, path: str, title: str = "", ylabel: str = "") -> str:
  """Grouped bars: one group per label, one bar per series (= {name: values per label})."""
  plt = pyplot()
  warn_if_cjk([title, ylabel, *labels, *series])
  fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(labels) + 2), 3.4 + 0.25 * len(series)))
  width = 0.8 / max(len(series), 1)
  for k, (name, values) in enumerate(series.items()):
    xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
    ax.bar(xs, values, width=width, label=name)
    for x, v in zip(xs, values):
      ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
  ax.set_xticks(range(len(labels)))
  ax.set_xticklabels(labels, fontsize=8)
  ax.set_ylabel(ylabel)
  top = max((v for values in series.values() for v in values), default=1.0)
  ax.set_ylim(0, top * 1.12 if top > 0 else 1.0)
  # Below the axes, so the legend never hides a bar.
  ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False)
  ax.grid(axis="y", alpha=0.3)
  return save(fig, path, title, suptitle=False)

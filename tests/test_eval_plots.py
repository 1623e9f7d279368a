"""The eval plots and the console summary, read from the matplotlib Figure objects (not pixels):
axis labels with units, names people read in the legends, the chance line of multiple choice,
intervals on counted accuracies, an honest value axis for tiny figures, no empty panel, step 0 on
the axis, bars for a single checkpoint; the console summary within 100 columns, correlations only
over at least 5 checkpoints. Synthetic per-checkpoint results: no model is needed."""

import math
import os

import pytest
from matplotlib.collections import PolyCollection
from matplotlib.patches import Rectangle

from llm_jax.eval import figures, plots, summary


def _row(step, f, n_choices=4):
  loss = 8.36 - 6 * f
  return {"step": step, "tasks": {
      "loss": {"loss": loss, "perplexity": math.exp(loss), "accuracy": 0.66 * f, "tokens": 40000,
               "doc_mean_loss": loss + 0.05},
      "repetition": {"prompts": 20, "rep_16": float("nan"),  # rep/l measured nowhere
                     "greedy": {"seq_rep_4": 0.4 - 0.3 * f, "loop_share": 0.0,
                                "mean_length": 30.0},
                     "chat_prompts": {"seq_rep_4": 0.0007 * f, "loop_share": 0.0}},
      "knowledge": {"all": {"exact": 0.02 * f, "contains": 0.5 * f, "count": 72},
                    "qa_trained": {"contains": 0.6 * f, "count": 48},
                    "qa_heldout": {"contains": 0.0, "count": 24},
                    "bio_unseen": {"contains": 0.0, "count": 0}},  # no such people: not measured
      "choice": {"acc": 0.27 + 0.02 * f, "acc_norm": 0.27 + 0.02 * f, "questions": 200,
                 "chance": 1 / n_choices}}}


def _figure(results, task):
  steps = [r["step"] for r in results]
  flat = [summary.flatten(r["tasks"]) for r in results]
  panels, notes = figures.panels_of(task, summary.headline_keys(flat), steps, flat)
  return figures.draw(panels, notes, title=f"run {task}")


def _legend(ax):
  leg = ax.get_legend()
  return [t.get_text() for t in leg.get_texts()] if leg else []


SWEEP = [_row(s, s / 300) for s in (0, 100, 200, 300)]


@pytest.fixture(autouse=True)
def _close_figures():
  yield
  plots.pyplot().close("all")


def test_every_panel_has_units_data_and_starts_at_step_0():
  axes = [ax for task in ("loss", "repetition", "knowledge", "choice")
          for ax in _figure(SWEEP, task).axes]
  assert len(axes) == 3 + 2 + 2 + 1
  for ax in axes:
    assert ax.get_ylabel() and ax.get_xlabel() == "training step", ax.get_title()
    assert ax.get_xlim()[0] <= 0 < ax.get_xlim()[1]
    drawn = [ln for ln in ax.get_lines() if not ln.get_label().startswith("chance")]
    assert drawn, f"empty panel {ax.get_title()!r}"
    # No panel is only flat zero lines without an interval.
    assert any(any(y != 0 for y in ln.get_ydata()) for ln in drawn) or any(
        isinstance(c, PolyCollection) for c in ax.collections), ax.get_title()
    for text in [ax.get_title(), ax.get_ylabel(), *_legend(ax)]:
      assert "." not in text.replace("0.", "").replace("(1 in", ""), text  # no metric keys
      assert "_" not in text, text


def test_multiple_choice_has_its_chance_line_and_an_interval():
  (ax,) = _figure([_row(s, s / 300, n_choices=5) for s in (100, 200, 300)], "choice").axes
  chance = [ln for ln in ax.get_lines() if ln.get_label().startswith("chance")]
  assert len(chance) == 1 and list(chance[0].get_ydata()) == [pytest.approx(0.2)] * 2
  # acc and acc_norm are equal (one-letter choices): one line naming both.
  assert [t for t in _legend(ax) if not t.startswith("chance")] == [
      "accuracy = accuracy, length-normalised"]
  band = [c for c in ax.collections if isinstance(c, PolyCollection)]
  assert len(band) == 1
  ys = band[0].get_paths()[0].vertices[:, 1]

  def wilson(p, n=200, z=1.959963984540054):  # the 95% Wilson score interval, written out
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    return centre - half, centre + half

  # The lowest accuracy (step 100) gives the band's bottom, the highest (step 300) its top.
  assert min(ys) == pytest.approx(wilson(0.27 + 0.02 / 3)[0], abs=1e-9)
  assert max(ys) == pytest.approx(wilson(0.29)[1], abs=1e-9)
  # The axis shows the chance line and the interval from 0, not a zoom on 0.27-0.29.
  assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= wilson(0.29)[1]


def test_wilson_interval_textbook_values():
  # p = 0/24: the upper bound is z^2 / (n + z^2); p = 0.5 over 100: 0.4038 to 0.5962.
  z2 = 1.959963984540054 ** 2
  assert figures.wilson(0.0, 24) == (pytest.approx(0.0, abs=1e-12), pytest.approx(z2 / (24 + z2)))
  lo, hi = figures.wilson(0.5, 100)
  assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)


def test_wilson_interval_holds_its_proportion_at_0_and_1():
  # At 0/n and n/n the bounds equal p only up to rounding (10/10 gave 0.9999999999999999): p must
  # stay inside, or the single-checkpoint bar chart's error bar is negative and matplotlib raises.
  for n in range(1, 200):
    for p in (0.0, 1.0, 1 / n):
      lo, hi = figures.wilson(p, n)
      assert lo <= p <= hi, (p, n, lo, hi)


def test_people_groups_named_unmeasured_and_all_zero_series_left_out():
  fig = _figure(SWEEP, "knowledge")
  by_title = {ax.get_title(): ax for ax in fig.axes}
  assert set(by_title) == {"all people", "value in the answer, by person"}
  people = _legend(by_title["value in the answer, by person"])
  # Held-out people at 0 over 24 probes are a measurement (with an interval) and stay; people
  # never in pretraining, counted 0, were not measured and are left out.
  assert people == ["trained people", "held-out people"]

  fig = _figure(SWEEP, "repetition")
  titles = [ax.get_title() for ax in fig.axes]
  assert "ending in a loop" not in titles  # 0 at every checkpoint: said in a note instead
  assert not any("rep/l" in t for t in titles)  # rep/l NaN everywhere: not measured
  notes = "\n".join(t.get_text() for t in fig.texts)
  assert "ending in a loop, greedy continuations: 0 at every checkpoint" in notes
  # 0-0.0007 is drawn on an axis of at least 0-0.1, beside the greedy line.
  ax = fig.axes[titles.index("repeated 4-grams (seq-rep-4)")]
  assert ax.get_ylim() == (0.0, pytest.approx(0.5)) and "fixed chat prompts" in _legend(ax)
  only_tiny = [dict(r, tasks={"repetition": {"chat_prompts": r["tasks"]["repetition"]["chat_prompts"]}})
               for r in SWEEP]
  (ax,) = _figure(only_tiny, "repetition").axes
  assert ax.get_ylim()[1] >= 0.1
  only_zero = [dict(r, tasks={"repetition": {"greedy": {"loop_share": 0.0}}}) for r in SWEEP]
  fig = _figure(only_zero, "repetition")
  assert not any(ax.get_lines() or ax.patches for ax in fig.axes)  # no empty panel drawn
  assert "0 at every checkpoint" in "\n".join(t.get_text() for t in fig.texts)


def test_a_single_checkpoint_is_bars_on_the_value_axis():
  fig = _figure([_row(300, 1.0)], "loss")
  assert fig._suptitle.get_text() == "run loss, step 300"
  titles = [ax.get_title() for ax in fig.axes]
  assert titles == ["eval loss", "perplexity", "token accuracy"]
  for ax in fig.axes:
    bars = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_width() > 0]
    assert bars and ax.get_xlabel() != "training step" and ax.get_xlabel()
    assert ax.get_xlim()[0] == 0  # from 0, not a window around one value
  names = [t.get_text() for t in fig.axes[0].get_yticklabels()]
  assert names == ["token-weighted", "mean over documents"]


def _console(n):
  results = [_row(100 * k, k / max(n - 1, 1)) for k in range(n)]
  flat = [summary.flatten(r["tasks"]) for r in results]
  return summary.console_table([r["step"] for r in results], flat, summary.headline_keys(flat),
                               title="run")


def test_console_summary_fits_100_columns_and_correlates_only_5_or_more_checkpoints(tmp_path):
  few = _console(4)
  assert "correlation" not in few and "held-out people" in few
  many = _console(14)
  lines = many.splitlines()
  assert max(len(line) for line in lines) <= 100, max(lines, key=len)
  steps_shown = lines[1].split()[1:]
  assert steps_shown[0] == "0" and steps_shown[-1] == "1300" and len(steps_shown) < 14
  assert "14 checkpoints" in lines[0] and "correlation with the eval loss" in many
  assert "knowledge." not in many and "accuracy (chance 0.25)" in many

  out = summary.write([_row(100 * k, k / 3) for k in range(4)], str(tmp_path), title="run",
                      draw=False)
  assert "Pearson" not in out["markdown"] and out["console"] == _console(4)
  # The files: one PNG per task (one task here, drawing is what costs time).
  rows = [dict(r, tasks={"choice": r["tasks"]["choice"]}) for r in SWEEP]
  summary.write(rows, str(tmp_path), title="run")
  assert os.listdir(tmp_path / "plots") == ["choice.png"]
  assert os.path.getsize(tmp_path / "plots" / "choice.png") > 1000


CJK_ON_DISK = [f for f in __import__("matplotlib.font_manager").font_manager.findSystemFonts()
               if "CJK" in os.path.basename(f)]


@pytest.fixture
def stale_font_cache(monkeypatch, tmp_path):
  """matplotlib as it is after `apt-get install fonts-noto-cjk` on a machine where it ran before:
  the font list (read from its cache) lacks the CJK fonts on disk. The cache directory is a tmp
  one, so the user's is not touched."""
  import copy
  import matplotlib
  from matplotlib import font_manager
  stale = copy.copy(font_manager.fontManager)
  stale.ttflist = [f for f in stale.ttflist if "CJK" not in f.name and "CJK" not in f.fname]
  monkeypatch.setattr(font_manager, "fontManager", stale)
  monkeypatch.setattr(matplotlib, "get_cachedir", lambda: str(tmp_path))
  monkeypatch.setattr(plots, "_state", {})
  return stale


@pytest.mark.skipif(not CJK_ON_DISK, reason="no CJK font on disk (apt-get install fonts-noto-cjk)")
def test_a_stale_font_cache_is_rebuilt_so_chinese_renders(stale_font_cache, tmp_path):
  from matplotlib import font_manager
  assert plots.missing_cjk_files()  # the stale list lacks what is on disk
  assert plots.cjk_font() in plots._CJK_FAMILIES
  assert not plots.missing_cjk_files()
  cache = font_manager.json_load(str(tmp_path / os.listdir(tmp_path)[0]))
  assert {f.fname for f in cache.ttflist} >= set(CJK_ON_DISK)  # the next run reads a fresh cache
  found = font_manager.findfont(font_manager.FontProperties(family=plots.cjk_font()),
                                fallback_to_default=False)
  assert "CJK" in os.path.basename(found)


@pytest.mark.skipif(not CJK_ON_DISK, reason="no CJK font on disk (apt-get install fonts-noto-cjk)")
def test_a_cache_that_cannot_be_rebuilt_names_the_command_not_the_package(stale_font_cache,
                                                                          monkeypatch, caplog):
  from matplotlib import font_manager

  def read_only(*args):
    raise PermissionError("read-only file system")

  monkeypatch.setattr(font_manager, "json_dump", read_only)
  monkeypatch.setattr(stale_font_cache, "addfont", lambda path: None)  # nothing gets added
  with caplog.at_level("WARNING"):
    assert plots.cjk_font() is None
  text = caplog.text
  assert "font cache predates" in text and "rm -rf" in text and "apt-get" not in text


def test_without_any_cjk_font_the_warning_names_the_package(stale_font_cache, monkeypatch,
                                                            caplog):
  from matplotlib import font_manager
  monkeypatch.setattr(font_manager, "findSystemFonts",
                      lambda *a, **k: [stale_font_cache.ttflist[0].fname])
  with caplog.at_level("WARNING"):
    plots.warn_if_cjk(["知识"])
  assert plots.cjk_font() is None and "apt-get install fonts-noto-cjk" in caplog.text

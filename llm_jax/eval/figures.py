"""What the eval plots show and how: a catalogue of the headline metrics (the names people read,
units, which panel, chance lines, confidence intervals), and the figures drawn from them.

Rules a reader can rely on:
  - one panel per quantity with one unit; several series of that unit share it, with a legend of
    names ("held-out people"), never metric keys;
  - the y-axis says the unit; shares (0-1) are drawn from 0, with at least 0-0.1 shown, so noise of
    a few thousandths is not stretched into a full-height trend; losses and lengths from 0;
  - accuracies over counted, independent trials (knowledge probes, multiple-choice questions)
    carry a 95% Wilson interval (shaded, or error bars); token-level shares (token accuracy, rep/l)
    do not: tokens of one document are no independent trials, and a binomial interval over them
    would claim a precision they do not have;
  - multiple choice has its chance line (the mean of 1/number of choices over the questions);
  - the x-axis is the training step and starts at 0, so a checkpoint at step 0 is on it;
  - a series measured nowhere (missing, or its count is 0) is left out; one that is exactly 0 at
    every checkpoint and has no interval (a loop share where nothing looped) is named in a note
    under the figure instead of being drawn as a flat line; a panel with nothing left is left out;
  - a single checkpoint is drawn as horizontal bars with the value axis, not as one-dot panels
    against a meaningless step axis.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

from llm_jax.eval import plots

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclasses.dataclass(frozen=True)
class Metric:
  """A headline metric. `pattern` matches the flattened key (task first); `name`, `panel`,
  `count` and `reference` may use its groups (\\1 ...) as re's Match.expand does."""
  pattern: str
  name: str  # legend name (within its panel)
  panel: str  # panel title; series of one panel share the unit
  unit: str  # y-axis label
  scale: str  # "share" (0-1) | "positive" (>= 0) | "perplexity" (>= 1, log when it spans 20x)
  count: str = ""  # flattened key of the number of trials: a binomial interval is drawn
  reference: str = ""  # flattened key of a reference value (chance), drawn as a dashed line
  reference_name: str = ""
  label: str = ""  # the console's name, short and without the panel ("" = the panel's name)


_LOSS, _SEQ = "loss (nats per token)", r"share of \1-grams seen before (0-1)"
_REP, _KNOW = r"repeated \1-grams (seq-rep-\1)", "value in the answer, by person"
CATALOGUE = (
    Metric(r"loss\.loss", "token-weighted", "eval loss", _LOSS, "positive",
           label="loss (token-weighted)"),
    Metric(r"loss\.doc_mean_loss", "mean over documents", "eval loss", _LOSS, "positive",
           label="loss (mean over documents)"),
    Metric(r"loss\.perplexity", "token-weighted", "perplexity", "perplexity (exp of the loss)",
           "perplexity", label="perplexity"),
    Metric(r"loss\.accuracy", "next token predicted", "token accuracy",
           "share of tokens right (0-1)", "share", label="token accuracy"),
    Metric(r"rouge\.rouge1", "Rouge-1 F1", "overlap with the references", "F1 / BLEU (0-1)",
           "share", label="Rouge-1 F1"),
    Metric(r"rouge\.rouge2", "Rouge-2 F1", "overlap with the references", "F1 / BLEU (0-1)",
           "share", label="Rouge-2 F1"),
    Metric(r"rouge\.rougeL", "Rouge-L F1", "overlap with the references", "F1 / BLEU (0-1)",
           "share", label="Rouge-L F1"),
    Metric(r"rouge\.bleu4", "BLEU-4", "overlap with the references", "F1 / BLEU (0-1)", "share",
           label="BLEU-4"),
    Metric(r"repetition\.greedy\.seq_rep_(\d+)", "greedy continuations", _REP, _SEQ, "share",
           label=r"seq-rep-\1, greedy"),
    Metric(r"repetition\.sampled\.seq_rep_(\d+)", "sampled continuations", _REP, _SEQ, "share",
           label=r"seq-rep-\1, sampled"),
    Metric(r"repetition\.chat_prompts\.seq_rep_(\d+)", "fixed chat prompts", _REP, _SEQ, "share",
           label=r"seq-rep-\1, chat prompts"),
    Metric(r"repetition\.greedy\.loop_share", "greedy continuations", "ending in a loop",
           "share of answers (0-1)", "share", label="ending in a loop, greedy"),
    Metric(r"repetition\.chat_prompts\.loop_share", "fixed chat prompts", "ending in a loop",
           "share of answers (0-1)", "share", label="ending in a loop, chat prompts"),
    Metric(r"repetition\.greedy\.distinct_2", "greedy continuations", "distinct bigrams",
           "distinct / all bigrams (0-1)", "share", label="distinct-2, greedy"),
    Metric(r"repetition\.greedy\.mean_length", "greedy continuations", "answer length",
           "tokens generated", "positive", label="length in tokens, greedy"),
    Metric(r"repetition\.rep_(\d+)", r"within the previous \1 tokens",
           "prediction repeats the context (rep/l)", "share of predictions (0-1)", "share",
           label=r"rep/\1 (teacher-forced)"),
    Metric(r"knowledge\.all\.exact", "whole answer exact", "all people", "answers right (0-1)",
           "share", count="knowledge.all.count", label="exact, all people"),
    Metric(r"knowledge\.all\.contains", "value in the answer", "all people",
           "answers right (0-1)", "share", count="knowledge.all.count",
           label="value in answer, all people"),
    Metric(r"knowledge\.qa_trained\.contains", "trained people", _KNOW, "answers right (0-1)",
           "share", count="knowledge.qa_trained.count", label="trained people"),
    Metric(r"knowledge\.qa_heldout\.contains", "held-out people", _KNOW, "answers right (0-1)",
           "share", count="knowledge.qa_heldout.count", label="held-out people"),
    Metric(r"knowledge\.qa_heldout\+bio_seen\.contains", "held-out people, biography read", _KNOW,
           "answers right (0-1)", "share", count="knowledge.qa_heldout+bio_seen.count",
           label="held-out people, biography read"),
    Metric(r"knowledge\.bio_unseen\.contains", "biography never read (floor)", _KNOW,
           "answers right (0-1)", "share", count="knowledge.bio_unseen.count",
           label="biography never read (floor)"),
    Metric(r"choice\.acc", "accuracy", "multiple choice", "questions right (0-1)", "share",
           count="choice.questions", reference="choice.chance", reference_name="chance",
           label="accuracy"),
    Metric(r"choice\.acc_norm", "accuracy, length-normalised", "multiple choice",
           "questions right (0-1)", "share", count="choice.questions", reference="choice.chance",
           reference_name="chance", label="accuracy, length-normalised"),
)


@dataclasses.dataclass
class Described:
  """A flattened key with what the catalogue says of it (the key itself where it says nothing)."""
  key: str
  name: str
  panel: str
  unit: str
  scale: str
  count: str
  reference: str
  reference_name: str
  label: str


def describe(key: str) -> Described:
  task = key.split(".", 1)[0]
  for m in CATALOGUE:
    match = re.fullmatch(m.pattern, key)
    if match:
      fill = lambda s: match.expand(s) if s else ""
      return Described(key, fill(m.name), fill(m.panel), fill(m.unit), m.scale, fill(m.count),
                       fill(m.reference), m.reference_name, fill(m.label) or fill(m.panel))
  rest = key.split(".", 1)[-1]
  return Described(key, rest, f"{task}: {rest}", rest, "any", "", "", "", rest)


def wilson(p: float, n: float, z: float = Z95) -> tuple[float, float]:
  """95% Wilson score interval of a binomial proportion p over n trials (sound at 0 and 1)."""
  if n <= 0:
    return (math.nan, math.nan)
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  # At p = 0 or 1 the bound equals p only up to rounding (1 - 1e-16 at p = 1): keep p inside, or
  # matplotlib refuses the negative error bar it would make.
  return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


@dataclasses.dataclass
class Series:
  name: str
  steps: list[int]
  values: list[float]
  low: list[float] | None = None  # interval bounds, when the metric has one
  high: list[float] | None = None
  count_key: str = ""  # what counted the trials (two groups of people both at 0 stay two lines)


@dataclasses.dataclass
class Panel:
  title: str
  unit: str
  scale: str
  series: list[Series]
  reference: tuple[float, str] | None = None  # (value, legend name)


def panels_of(task: str, keys: Sequence[str], steps: Sequence[int],
              rows: Sequence[dict]) -> tuple[list[Panel], list[str]]:
  """The panels of one task's figure, and notes for under it (series left out and why)."""
  panels: dict[str, Panel] = {}
  notes = []
  for key in keys:
    if key.split(".", 1)[0] != task:
      continue
    d = describe(key)
    pts = [(s, row[key], row.get(d.count)) for s, row in zip(steps, rows)
           if _finite(row.get(key)) and not (d.count and row.get(d.count) == 0)]
    if not pts:
      continue  # measured nowhere
    xs, ys, ns = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
    low = high = None
    if d.count and all(_finite(n) and n > 0 for n in ns):
      low, high = zip(*(wilson(y, n) for y, n in zip(ys, ns)))
      low, high = list(low), list(high)
    if low is None and all(y == 0 for y in ys):
      notes.append(f"{d.panel}, {d.name}: 0 at every checkpoint evaluated")
      continue
    panel = panels.setdefault(d.panel, Panel(d.panel, d.unit, d.scale, []))
    same = next((s for s in panel.series
                 if s.steps == xs and s.values == ys and s.count_key == d.count), None)
    if same is not None:  # acc_norm = acc for one-letter choices: one line, both names
      same.name = f"{same.name} = {d.name}"
      continue
    panel.series.append(Series(d.name, xs, ys, low, high, d.count))
    if d.reference:
      ref = [row[d.reference] for row in rows if _finite(row.get(d.reference))]
      if ref:
        value = ref[-1]
        choices = f" (1 in {1 / value:.3g})" if d.reference_name == "chance" and value > 0 else ""
        panel.reference = (value, d.reference_name + choices)
  return list(panels.values()), notes


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _value_limits(panel: Panel) -> tuple[float, float, bool]:
  """(low, high, log) of the value axis: shares from 0 with at least 0-0.1 shown, losses and
  lengths from 0, perplexity on a log axis when it spans 20x (else from 0)."""
  tops = [v for s in panel.series for v in (s.high or s.values)]
  if panel.reference:
    tops.append(panel.reference[0])
  top = max(tops)
  if panel.scale == "share":
    high = 1.0 if top > 0.6 else max(0.1, math.ceil(top * 1.2 / 0.05) * 0.05)
    return 0.0, min(high, 1.0) + (0.02 if top > 0.6 else 0.0), False
  if panel.scale == "perplexity":
    bottom = min(v for s in panel.series for v in s.values)
    if bottom > 0 and top / bottom > 20:
      return max(1.0, bottom / 1.5), top * 1.5, True
  bottom = min(v for s in panel.series for v in s.values)
  if bottom >= 0:
    return 0.0, top * 1.1 if top > 0 else 1.0, False
  return bottom - 0.1 * abs(bottom), top + 0.1 * abs(top), False


def draw(panels: Sequence[Panel], notes: Sequence[str], title: str = ""):
  """The figure of one task: line panels over the training step, or, when every series has one
  checkpoint (the same one), horizontal bars. Returns the matplotlib Figure (not saved)."""
  plots.warn_if_cjk([title, *(p.title for p in panels), *(s.name for p in panels for s in p.series)])
  all_steps = {x for p in panels for s in p.series for x in s.steps}
  single = len(all_steps) == 1
  if not panels:  # every series left out: the figure says why instead of showing empty axes
    fig, ax = plots.pyplot().subplots(figsize=(6.4, 1.2 + 0.15 * len(notes)))
    ax.axis("off")
    ax.text(0.5, 0.7, "nothing to draw: no figure was measured, or every one is 0",
            ha="center", va="center", fontsize=9)
    axes = [ax]
  elif single:
    heights = [0.9 + 0.42 * (len(p.series) + (p.reference is not None)) for p in panels]
    fig, axes = plots.pyplot().subplots(
        max(len(panels), 1), 1, figsize=(7.0, sum(heights) + 0.6 + 0.2 * len(notes)),
        gridspec_kw={"height_ratios": heights} if panels else None, squeeze=False)
    axes = list(axes.flat)
    for ax, panel in zip(axes, panels):
      _bars(ax, panel)
    if title:
      title = f"{title}, step {all_steps.pop()}"
  else:
    fig, axes = plots.panel_grid(len(panels), width=4.4, height=3.2)
    for ax, panel in zip(axes, panels):
      _lines(ax, panel)
  text = list(notes)
  if any(s.low is not None for p in panels for s in p.series):
    text.append("shaded bands / error bars: 95% Wilson interval over the counted answers")
  bottom = 0.0
  if text:
    fig.text(0.01, 0.01, "\n".join(text), fontsize=7, color="0.35", ha="left", va="bottom")
    bottom = (0.08 + 0.13 * len(text)) / fig.get_figheight()
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, bottom, 1, 1))
  return fig


def _lines(ax, panel: Panel) -> None:
  last = 0
  for s, marker in zip(panel.series, "osD^v<>ph*" * 3):  # markers tell overlapping lines apart
    (line,) = ax.plot(s.steps, s.values, marker=marker, markersize=3.5, linewidth=1.5,
                      label=s.name)
    if s.low is not None:
      ax.fill_between(s.steps, s.low, s.high, color=line.get_color(), alpha=0.15, linewidth=0)
    last = max(last, max(s.steps))
  if panel.reference:
    ax.axhline(panel.reference[0], color="0.4", linestyle="--", linewidth=1,
               label=panel.reference[1])
  low, high, log = _value_limits(panel)
  if log:
    ax.set_yscale("log")
  ax.set_ylim(low, high)
  ax.set_xlim(-0.03 * max(last, 1), max(last, 1) * 1.04)  # from step 0
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top
  ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True, steps=[1, 2, 2.5, 5, 10]))
  ax.set_title(panel.title, fontsize=9)
  ax.set_xlabel("training step", fontsize=8)
  ax.set_ylabel(panel.unit, fontsize=8)
  ax.tick_params(labelsize=7)
  ax.grid(alpha=0.3)
  if len(panel.series) > 1 or panel.reference:
    ax.legend(fontsize=7)


def _bars(ax, panel: Panel) -> None:
  names = [s.name for s in panel.series]
  values = [s.values[0] for s in panel.series]
  ys = list(range(len(names)))[::-1]
  err = None
  if any(s.low is not None for s in panel.series):
    err = [[max(0.0, v - (s.low[0] if s.low else v)) for s, v in zip(panel.series, values)],
           [max(0.0, (s.high[0] if s.high else v) - v) for s, v in zip(panel.series, values)]]
  ax.barh(ys, values, xerr=err, height=0.6, color="#4c72b0", capsize=3,
          error_kw={"elinewidth": 1, "ecolor": "0.3"})
  low, high, log = _value_limits(panel)
  if log:
    ax.set_xscale("log")
  ax.set_xlim(low, high)
  ends = values if err is None else [v + e for v, e in zip(values, err[1])]
  starts = values if err is None else [v - e for v, e in zip(values, err[0])]
  for y, v, end, start in zip(ys, values, ends, starts):
    if not log and end > low + 0.85 * (high - low):  # no room after it: inside the bar, in white
      ax.text(start, y, f"{v:.3g}  ", va="center", ha="right", fontsize=7, color="white")
    else:  # the figure after the bar and its interval
      ax.text(end, y, f"  {v:.3g}", va="center", ha="left", fontsize=7)
  if panel.reference:
    ax.axvline(panel.reference[0], color="0.4", linestyle="--", linewidth=1,
               label=panel.reference[1])
    ax.legend(fontsize=7, loc="lower right")
  ax.set_yticks(ys)
  ax.set_yticklabels(names, fontsize=8)
  ax.set_title(panel.title, fontsize=9)
  ax.set_xlabel(panel.unit, fontsize=8)
  ax.tick_params(labelsize=7)
  ax.grid(axis="x", alpha=0.3)

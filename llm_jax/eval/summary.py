"""From per-checkpoint results to what a person reads: a Markdown table of headline metrics by
step (with each metric's correlation with the eval loss), a CSV of every numeric figure, PNG
plots of every headline metric against the step, and the fixed chat prompts' answers side by
side across checkpoints."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from typing import Sequence

import numpy as np

from llm_jax.eval import figures, plots, rouge

MIN_CORRELATION_CHECKPOINTS = 5  # fewer points make a correlation noise, so none is printed
CONSOLE_WIDTH = 100  # the summary printed after a sweep fits a terminal this wide

# Headline figures per task (flattened paths); those present in the results are shown.
HEADLINE = {
    "loss": ["loss", "perplexity", "accuracy", "doc_mean_loss"],
    "rouge": ["rouge1", "rouge2", "rougeL", "bleu4"],
    "repetition": [r"greedy.seq_rep_\d+", r"sampled.seq_rep_\d+", "greedy.loop_share",
                   "greedy.distinct_2", "greedy.mean_length", r"rep_\d+",
                   r"chat_prompts.seq_rep_\d+", "chat_prompts.loop_share"],
    "knowledge": ["all.exact", "all.contains", "qa_trained.contains", "qa_heldout.contains",
                  "bio_unseen.contains", "qa_heldout+bio_seen.contains"],
    "choice": ["acc", "acc_norm"],
}


def flatten(tree, prefix: str = "") -> dict:
  """Numeric leaves of a nested dict as {"a.b.c": float}."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, path + "."))
    elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
      out[path] = float(v)
  return out


def headline_keys(flat_rows: Sequence[dict]) -> list[str]:
  present = set().union(*flat_rows) if flat_rows else set()
  keys = []
  for task, patterns in HEADLINE.items():
    for pattern in patterns:
      keys += sorted((k for k in present
                      if re.fullmatch(f"{re.escape(task)}\\.{pattern}", k) and k not in keys),
                     key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)])
  return keys


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):  # a constant has no correlation
    return None
  return float(np.corrcoef(x, y)[0, 1])


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
  rank = lambda v: np.argsort(np.argsort(np.asarray(v), kind="stable"), kind="stable")
  return pearson(rank(x), rank(y)) if len(x) >= 3 else None


def _fmt(v) -> str:
  if v is None:
    return ""
  if abs(v) >= 1000 or v == int(v):
    return f"{v:.0f}"
  return f"{v:.4f}"


def load_results(json_dir: str) -> list[dict]:
  """Every eval_<step>.json in a directory, by step."""
  out = []
  for name in os.listdir(json_dir):
    m = re.fullmatch(r"eval_(\d+)\.json", name)
    if m:
      with open(os.path.join(json_dir, name), encoding="utf-8") as f:
        res = json.load(f)
      if "tasks" not in res and "loss" in res:  # written by the eval job before tasks existed
        res["tasks"] = {"loss": {k: v for k, v in res.items() if k not in ("step", "data")}}
      out.append(res)
  return sorted(out, key=lambda r: r["step"])


def write(results: Sequence[dict], out_dir: str, *, draw: bool = True, title: str = "") -> dict:
  """summary.md, summary.csv, plots/*.png and samples/chat_prompts.md under out_dir.
  Returns {"markdown": text, "files": [paths]}."""
  os.makedirs(out_dir, exist_ok=True)
  steps = [r["step"] for r in results]
  flat = [flatten(r.get("tasks", {})) for r in results]
  keys = headline_keys(flat)
  files = []

  all_keys = sorted(set().union(*flat)) if flat else []
  csv_path = os.path.join(out_dir, "summary.csv")
  with open(csv_path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["step", *all_keys])
    for s, row in zip(steps, flat):
      w.writerow([s, *[row.get(k, "") for k in all_keys]])
  files.append(csv_path)

  lines = [f"# {title or 'Evaluation'}", "", "| step | " + " | ".join(keys) + " |",
           "|---:|" + "---:|" * len(keys)]
  for s, row in zip(steps, flat):
    lines.append(f"| {s} | " + " | ".join(_fmt(row.get(k)) for k in keys) + " |")
  tokenizers = sorted({r["tasks"]["rouge"]["tokenizer"] for r in results
                       if r.get("tasks", {}).get("rouge", {}).get("tokenizer")})
  if tokenizers:  # Rouge and BLEU depend on what a token is: say it beside the figures
    lines += ["", "Rouge and BLEU: " + "; ".join(rouge.describe(t) for t in tokenizers) + "."]
  if "loss.loss" in keys and len(steps) >= MIN_CORRELATION_CHECKPOINTS:
    lines += ["", "Correlation with the eval loss across checkpoints (Pearson r / Spearman rho):",
              ""]
    for k in keys:
      if k == "loss.loss":
        continue
      pairs = [(row["loss.loss"], row[k]) for row in flat if k in row and "loss.loss" in row]
      enough = len(pairs) >= MIN_CORRELATION_CHECKPOINTS
      r = pearson(*zip(*pairs)) if enough else None
      rho = spearman(*zip(*pairs)) if enough else None
      if r is not None:
        lines.append(f"- {k}: r = {r:+.3f}, rho = {rho:+.3f} ({len(pairs)} checkpoints)")
  markdown = "\n".join(lines) + "\n"
  md_path = os.path.join(out_dir, "summary.md")
  with open(md_path, "w", encoding="utf-8") as f:
    f.write(markdown)
  files.append(md_path)

  if draw and keys:
    plot_dir = os.path.join(out_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    for task in dict.fromkeys(k.split(".")[0] for k in keys):
      panels, notes = figures.panels_of(task, keys, steps, flat)
      fig = figures.draw(panels, notes, title=f"{title} {task}".strip())
      files.append(plots.save(fig, os.path.join(plot_dir, f"{task}.png"), layout=False))
  chat = chat_prompts_markdown(out_dir, steps)
  if chat:
    files.append(chat)
  return {"markdown": markdown, "files": files,
          "console": console_table(steps, flat, keys, title=title)}


def console_table(steps: Sequence[int], flat: Sequence[dict], keys: Sequence[str], *,
                  title: str = "", width: int = CONSOLE_WIDTH) -> str:
  """The headline figures by name (rows) and checkpoint (columns), at most `width` columns wide:
  when the checkpoints do not fit, the first, the last and evenly spaced ones between are shown
  (summary.md and summary.csv have all). Correlations with the eval loss only over at least
  MIN_CORRELATION_CHECKPOINTS checkpoints."""
  cell = 8  # a space and _short's at most 7 characters
  names = [_console_name(k, flat[-1] if flat else {}) for k in keys]
  label = min(44, max([len(n) + 3 for n in names] + [24]))
  fit = max(1, (width - label) // cell)
  if len(steps) <= fit:
    shown = list(range(len(steps)))
  else:
    shown = sorted({round(i * (len(steps) - 1) / (fit - 1)) for i in range(fit)}) if fit > 1 \
        else [len(steps) - 1]
  clip = lambda s, n: s if len(s) <= n else s[:n - 1] + "…"
  head = f"{title or 'Evaluation'}: {len(steps)} checkpoint{'s' * (len(steps) != 1)}"
  if len(shown) < len(steps):
    head += f", {len(shown)} shown (every one in summary.md)"
  lines = [clip(head, width), clip("step".rjust(label), label) + "".join(
      f"{steps[i]:>{cell}}" for i in shown)]
  task = None
  for k in keys:
    d = figures.describe(k)
    if k.split(".")[0] != task:
      task = k.split(".")[0]
      lines.append(task)
    name = d.label
    if d.reference and _finite(flat[shown[-1]].get(d.reference)):
      name += f" ({d.reference_name} {flat[shown[-1]][d.reference]:.3g})"
    cells = "".join(f"{_short(flat[i].get(k)):>{cell}}" for i in shown)
    lines.append(clip("  " + name, label - 1).ljust(label) + cells)
  if "loss.loss" in keys:
    corr = []
    for k in keys:
      pairs = [(row["loss.loss"], row[k]) for row in flat if k in row and "loss.loss" in row]
      if k == "loss.loss" or len(pairs) < MIN_CORRELATION_CHECKPOINTS:
        continue
      r, rho = pearson(*zip(*pairs)), spearman(*zip(*pairs))
      if r is not None:
        d = figures.describe(k)
        corr.append(clip(f"  r {r:+.2f}  rho {rho:+.2f}  {k.split('.')[0]}: {d.label}", width))
    if corr:
      lines += [f"correlation with the eval loss over {len(steps)} checkpoints (Pearson r, "
                "Spearman rho):", *corr]
  return "\n".join(lines)


def _console_name(key: str, row: dict) -> str:
  d = figures.describe(key)
  if d.reference and _finite(row.get(d.reference)):
    return f"{d.label} ({d.reference_name} {row[d.reference]:.3g})"
  return d.label


def _short(v) -> str:
  """A figure in at most 7 characters."""
  if v is None:
    return "-"
  if abs(v) >= 1e5:
    return f"{v:.1e}"
  if v == int(v):
    return f"{v:.0f}"
  if abs(v) >= 100:
    return f"{v:.1f}"
  if abs(v) >= 10:
    return f"{v:.2f}"
  return f"{v:.4f}"


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def chat_prompts_markdown(out_dir: str, steps: Sequence[int]) -> str | None:
  """samples/chat_prompts.md: each fixed prompt's answer at every checkpoint, side by side."""
  answers: dict[str, dict[int, str]] = {}
  for s in steps:
    path = os.path.join(out_dir, "samples", f"step_{s}_repetition.jsonl")
    if not os.path.exists(path):
      continue
    with open(path, encoding="utf-8") as f:
      for line in f:
        rec = json.loads(line)
        if rec.get("kind") == "chat_prompt":
          answers.setdefault(rec["prompt"], {})[s] = rec["answer"]
  if not answers:
    return None
  lines = ["# Fixed prompts across checkpoints (greedy)", ""]
  for prompt, by_step in answers.items():
    lines += [f"## {prompt}", "", "| step | answer |", "|---:|---|"]
    for s in sorted(by_step):
      text = by_step[s].replace("|", "\\|").replace("\n", " ⏎ ")
      lines.append(f"| {s} | {text} |")
    lines.append("")
  path = os.path.join(out_dir, "samples", "chat_prompts.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))
  return path

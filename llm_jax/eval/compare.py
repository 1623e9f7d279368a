"""Compare runs side by side: each run's latest eval_<step>.json, chosen metrics, as a Markdown
table, a CSV and a grouped bar chart.

  python -m llm_jax.eval.compare --runs=runs/a,runs/b --labels="pretrain+SFT,SFT only" \\
    --metrics=knowledge.qa_heldout.contains,choice.acc --out=reports/knowledge

Writes <out>.md, <out>.csv and <out>.png and prints the table. Metric names are the flattened
paths of summary.csv (task.figure, e.g. loss.loss, repetition.greedy.seq_rep_4).
"""

import csv
import os

from absl import flags

from llm_jax import console
from llm_jax.eval import plots, summary

_RUNS = flags.DEFINE_list("runs", None, "Run directories (or eval out_dirs) holding eval_<step>.json.")
_LABELS = flags.DEFINE_list("labels", [], "A label per run (default: the directory names).")
_METRICS = flags.DEFINE_list("metrics", None, "Flattened metric names, e.g. knowledge.qa_heldout.contains.")
_OUT = flags.DEFINE_string("out", None, "Output path without extension (.md, .csv, .png are added).")
_TITLE = flags.DEFINE_string("title", "", "Title of the table and the plot.")
flags.mark_flags_as_required(["runs", "metrics", "out"])


def compare(runs, labels, metrics, out, title=""):
  labels = list(labels) or [os.path.basename(os.path.normpath(r)) for r in runs]
  if len(labels) != len(runs):
    raise ValueError(f"--labels has {len(labels)} entries for {len(runs)} runs")
  rows = []
  for run in runs:
    results = summary.load_results(run) if os.path.isdir(run) else []
    if not results:
      raise ValueError(f"{run}: no eval_<step>.json; run the eval job on it first")
    last = results[-1]
    flat = summary.flatten(last.get("tasks", {}))
    rows.append((last["step"], flat))
  missing = [(m, r) for m in metrics for r, (_, flat) in zip(runs, rows) if m not in flat]
  if missing:
    raise ValueError(f"metric {missing[0][0]!r} is not in {missing[0][1]}'s results")
  lines = [f"| run | step | " + " | ".join(metrics) + " |", "|---|---:|" + "---:|" * len(metrics)]
  for label, (step, flat) in zip(labels, rows):
    lines.append(f"| {label} | {step} | " + " | ".join(f"{flat[m]:.3f}" for m in metrics) + " |")
  table = (f"**{title}**\n\n" if title else "") + "\n".join(lines) + "\n"
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".md", "w", encoding="utf-8") as f:
    f.write(table)
  with open(out + ".csv", "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["run", "step", *metrics])
    for label, (step, flat) in zip(labels, rows):
      w.writerow([label, step, *[flat[m] for m in metrics]])
  plots.bars(labels, {m: [flat[m] for _, flat in rows] for m in metrics}, out + ".png",
             title=title)
  return table


def main():
  print(compare(_RUNS.value, _LABELS.value, _METRICS.value, _OUT.value, _TITLE.value))


if __name__ == "__main__":
  console.cli(main)

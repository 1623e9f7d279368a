"""Compare runs side by side: each run's latest eval_<step>.json, chosen metrics, as a Markdown
table, a CSV and a grouped bar chart.

  python -m llm_jax.eval.compare --runs=runs/a,runs/b --labels="pretrain+SFT,SFT only" \\
    --metrics=knowledge.qa_heldout.contains,choice.acc --out=reports/knowledge

Writes <out>.md, <out>.csv and <out>.png (--out is required: nothing lands in the current
directory unasked), prints the table and the three paths. A run without an eval yet is one line
naming it and the command that makes its eval. Metric names are the flattened
paths of summary.csv (task.figure, e.g. loss.loss, repetition.greedy.seq_rep_4).
"""

import csv
import os

from absl import flags

from llm_jax import console
from llm_jax.eval import plots, summary



EVAL_COMMAND = "python -m llm_jax.main --config=configs/eval.py --workdir={run}"


def _latest_eval(run: str) -> dict:
  """The run's latest eval_<step>.json; a run without one is one line naming it and the command
  that makes its eval."""
  if not os.path.isdir(run):
    raise FileNotFoundError(f"{run}: no such run directory (--runs takes run directories, or "
                            "eval out_dirs, holding eval_<step>.json)")
  results = summary.load_results(run)
  if not results:
    raise ValueError(f"{run} has no eval yet (no eval_<step>.json in it); make one with: "
                     + EVAL_COMMAND.format(run=run))
  return results[-1]


def output_paths(out: str) -> list[str]:
  """The three files `compare` writes for --out (absolute, as the console says them)."""
  base = os.path.abspath(out)
  return [base + ext for ext in (".md", ".csv", ".png")]


def compare(runs, labels, metrics, out, title=""):
  """The table (Markdown text); writes `output_paths(out)`."""
  labels = list(labels) or [os.path.basename(os.path.normpath(r)) for r in runs]
  if len(labels) != len(runs):
    raise ValueError(f"--labels has {len(labels)} entries for {len(runs)} runs")
  rows = []
  for run in runs:
    last = _latest_eval(run)
    rows.append((last["step"], summary.flatten(last.get("tasks", {})), last))
  for m in metrics:
    for run, (step, flat, last) in zip(runs, rows):
      if m not in flat:
        task = m.split(".")[0]
        have = sorted(last.get("tasks", {}))
        if task not in have:
          raise ValueError(f"metric {m!r}: {run}'s latest eval (step {step}) has no {task} task "
                           f"(it has {', '.join(have) or 'none'}); add it with: "
                           + EVAL_COMMAND.format(run=run) + f" --config.eval.tasks={task}")
        near = [k for k in flat if k.startswith(task + ".")][:6]
        raise ValueError(f"metric {m!r} is not in {run}'s results (step {step}); its {task} "
                         f"figures include {', '.join(near)}")
  md_path, csv_path, png_path = output_paths(out)
  lines = [f"| run | step | " + " | ".join(metrics) + " |", "|---|---:|" + "---:|" * len(metrics)]
  for label, (step, flat, _) in zip(labels, rows):
    lines.append(f"| {label} | {step} | " + " | ".join(f"{flat[m]:.3f}" for m in metrics) + " |")
  table = (f"**{title}**\n\n" if title else "") + "\n".join(lines) + "\n"
  os.makedirs(os.path.dirname(md_path), exist_ok=True)
  with open(md_path, "w", encoding="utf-8") as f:
    f.write(table)
  with open(csv_path, "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["run", "step", *metrics])
    for label, (step, flat, _) in zip(labels, rows):
      w.writerow([label, step, *[flat[m] for m in metrics]])
  plots.bars(labels, {m: [flat[m] for _, flat, _ in rows] for m in metrics}, png_path,
             title=title)
  return table


def main():
  f = flags.FLAGS
  print(compare(f.runs, f.labels, f.metrics, f.out, f.title))
  print("written: " + ", ".join(output_paths(f.out)))


if __name__ == "__main__":
  # Defined here, not at import, so importing this module (the tests do) never clashes with the
  # flags of another command's module (train_tokenizer's --out).
  flags.DEFINE_list("runs", None, "Run directories (or eval out_dirs) holding eval_<step>.json.")
  flags.DEFINE_list("labels", [], "A label per run (default: the directory names).")
  flags.DEFINE_list("metrics", None, "Flattened metric names, e.g. knowledge.qa_heldout.contains.")
  flags.DEFINE_string("out", None, "Output path without extension (.md, .csv, .png are added), "
                      "relative to the current directory unless absolute.")
  flags.DEFINE_string("title", "", "Title of the table and the plot.")
  flags.mark_flags_as_required(["runs", "metrics", "out"])
  console.cli(main)

"""What the notebooks in colab/ need beyond the jobs themselves: a job's config with overrides
checked by name, llm_jax's progress lines shown in the notebook, and small Markdown tables of eval
results, devices and shardings. Training, chat, eval and conversion are the library's own
functions, called from the cells as a script would call them.
"""

from __future__ import annotations

import difflib
import glob
import importlib
import json
import logging as py_logging
import math
import os
import sys
from typing import Any, Mapping

import ml_collections
from absl import logging

from llm_jax import config_check, console, fields  # console first: it quiets TensorFlow
from llm_jax.model import init as model_init


# ---------------------------------------------------------------------------------------------
# Logs


class _Lines(py_logging.Formatter):
  """The message alone for INFO (a progress line); warnings and errors say what they are."""

  def format(self, record):
    msg = super().format(record)
    return msg if record.levelno <= py_logging.INFO else f"{record.levelname}: {msg}"


class _CellHandler(py_logging.StreamHandler):
  """The handler show_logs installs (found again and replaced when it is called again)."""


def show_logs(verbose: bool = False) -> None:
  """Shows llm_jax's INFO lines (progress, metrics) as plain lines in the cell's output, and
  other libraries' only from WARNING up (`verbose` shows them all). Safe to call again."""
  console.setup(verbose)
  # Outside `absl.app.run` absl's own handler is not installed and its records go to whatever
  # handler the notebook's root logger has, unfiltered; give absl's logger a handler of its own.
  absl_logger = py_logging.getLogger("absl")
  for h in [h for h in absl_logger.handlers if isinstance(h, _CellHandler)]:
    absl_logger.removeHandler(h)
  handler = _CellHandler(sys.stdout)
  handler.setFormatter(_Lines("%(message)s"))
  for f in logging.get_absl_handler().filters:  # console.setup's filter: our INFO, others WARNING+
    handler.addFilter(f)
  absl_logger.addHandler(handler)
  absl_logger.propagate = False


# ---------------------------------------------------------------------------------------------
# Configs


def apply_overrides(c: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    name: str = "OVERRIDES") -> ml_collections.ConfigDict:
  """Sets config fields by dotted name, as `--config.train.lr=1e-3` does on the command line: an
  unknown name or a value of the wrong type raises one line naming it (ml_collections'
  `update_from_flattened_dict` would silently add a misspelt field instead)."""
  known = list(fields.flatten(c))
  for path, value in overrides.items():
    if path not in known:
      close = difflib.get_close_matches(path, known, n=1)
      hint = f"; did you mean {close[0]!r}?" if close else ""
      raise ValueError(f"{name}: {path!r} is not a config field{hint} (fields are dotted paths "
                       "such as 'train.lr' or 'model.dim'; see configs/base.py)")
    *parents, leaf = path.split(".")
    node = c
    for p in parents:
      node = node[p]
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ValueError(f"{name}: {path}={value!r} does not fit the field (it holds "
                       f"{type(node[leaf]).__name__} {node[leaf]!r}): {e}") from None
  return c


def config(job: str, preset: str | None = None,
           overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """configs/<job>.py's get_config(preset), with `overrides` applied and the result validated
  (what `python -m llm_jax.main --config=configs/<job>.py:<preset> --config.<field>=...` runs)."""
  try:
    module = importlib.import_module(f"configs.{job}")
  except ModuleNotFoundError:
    raise ValueError(f"no configs/{job}.py: the jobs are the files in configs/ (pretrain, sft, "
                     "eval, dpo, distill)") from None
  c = module.get_config(preset or None)
  apply_overrides(c, overrides or {})
  config_check.validate(c)
  return c


# ---------------------------------------------------------------------------------------------
# Devices and shardings


def describe_devices() -> str:
  """One line: how many devices of which kind, and whether they are a CPU's virtual devices."""
  import jax  # pylint: disable=g-import-not-at-top
  devs = jax.devices()
  line = f"{len(devs)} x {devs[0].device_kind} ({devs[0].platform})"
  if devs[0].platform == "cpu":
    flags = os.environ.get("XLA_FLAGS", "")
    virtual = "xla_force_host_platform_device_count" in flags and len(devs) > 1
    line += (f": no accelerator; {len(devs)} virtual CPU devices (XLA_FLAGS={flags}) share this "
             f"machine's {os.cpu_count()} cores, so the mesh and shardings are real but the speed "
             "is a CPU's" if virtual else ": no accelerator")
  return line


def _md(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def rules_table(rules) -> str:
  """config.sharding_rules as Markdown: logical axis -> mesh axes (or replicated)."""
  def axes(a):
    if a is None:
      return "replicated"
    return " x ".join(a) if isinstance(a, (tuple, list)) else a
  return _md(["logical axis", "mesh axes"], [[f"`{name}`", axes(a)] for name, a in rules])


def params_table(model_cfg, mesh, rules) -> str:
  """Every parameter with its shape, PartitionSpec and the shard one device holds, computed
  with jax.eval_shape exactly as the trainer places them (nothing is allocated)."""
  import jax  # pylint: disable=g-import-not-at-top
  abstract, shardings = model_init.abstract(model_cfg, mesh, rules)
  rows = []
  total = per_device = 0
  flat_a = jax.tree_util.tree_flatten_with_path(abstract)[0]
  for (path, a), s in zip(flat_a, jax.tree.leaves(shardings)):
    shard = s.shard_shape(a.shape)
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    rows.append([f"`{name}`", tuple(a.shape), str(a.dtype), f"`{s.spec}`", tuple(shard)])
    total += a.size * a.dtype.itemsize
    per_device += math.prod(shard) * a.dtype.itemsize
  table = _md(["parameter", "shape", "dtype", "PartitionSpec", "per device"], rows)
  return (table + f"\n{total / 2**20:.2f} MiB of parameters in all, {per_device / 2**20:.2f} MiB "
          f"on each of the {mesh.size} devices (mesh {dict(mesh.shape)})\n")


# ---------------------------------------------------------------------------------------------
# Eval results


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.3f}"
  return "" if v is None else str(v)


def _get(tree: Mapping, path: str):
  for k in path.split("."):
    if not isinstance(tree, Mapping) or k not in tree:
      return None
    tree = tree[k]
  return tree


REPETITION_ROWS = (
    ("greedy.seq_rep_4", "greedy answers: share of repeated 4-grams"),
    ("greedy.loop_share", "greedy answers ending in a loop"),
    ("greedy.distinct_2", "greedy answers: distinct bigrams"),
    ("greedy.mean_length", "greedy answers: mean length (tokens)"),
    ("sampled.seq_rep_4", "sampled answers: repeated 4-grams"),
    ("rep_16", "rep/16 (next token repeats one of the last 16)"),
    ("rep_128", "rep/128"),
    ("chat_prompts.seq_rep_4", "fixed chat prompts: repeated 4-grams"),
)
KNOWLEDGE_ROWS = (
    ("all", "every probe"),
    ("qa_trained", "people whose QA was in SFT"),
    ("qa_heldout", "held-out people (QA never trained on)"),
    ("bio_seen", "people whose biography was pretrained on"),
    ("bio_unseen", "people whose biography was never seen"),
)


def eval_tables(results: Mapping[int, Mapping]) -> str:
  """Markdown tables of the eval job's repetition and knowledge figures, a column per checkpoint
  step. `results`: what `llm_jax.eval.job.run_eval` returns ({step: that step's JSON})."""
  steps = sorted(results)
  tasks = {s: results[s].get("tasks", {}) for s in steps}
  out = []
  header = ["", *[f"step {s}" for s in steps]]
  if any("repetition" in t for t in tasks.values()):
    rows = [[label, *[_fmt(_get(tasks[s].get("repetition", {}), k)) for s in steps]]
            for k, label in REPETITION_ROWS
            if any(_get(tasks[s].get("repetition", {}), k) is not None for s in steps)]
    out.append("**Repetition** (lower is better, except distinct bigrams)\n\n" + _md(header, rows))
  if any("knowledge" in t for t in tasks.values()):
    rows = []
    for k, label in KNOWLEDGE_ROWS:
      cells = [_get(tasks[s].get("knowledge", {}), k) for s in steps]
      if any(c is not None for c in cells):
        rows.append([label, *[f"{c['contains']:.3f} / {c['exact']:.3f} (n={c['count']})"
                              if c else "" for c in cells]])
    out.append("**Knowledge**: share of greedy answers that contain the right value / are "
               "exactly it\n\n" + _md(header, rows))
  return "\n".join(out)


def _cell(text) -> str:
  return str(text).replace("|", "\\|").replace("\n", " ⏎ ")


def knowledge_answers(runs: Mapping[str, str], qa: str = "heldout", n: int = 6) -> str:
  """Markdown: the first `n` knowledge probes of a QA group ("heldout" or "trained") with the
  reference and each run's greedy answer, from the latest eval's
  eval/samples/step_<step>_knowledge.jsonl of each run ({label: workdir})."""
  answers = {}
  for label, wd in runs.items():
    found = glob.glob(os.path.join(wd, "eval", "samples", "step_*_knowledge.jsonl"))
    if not found:
      raise FileNotFoundError(f"{wd}: no knowledge samples; run the eval job with "
                              "eval.tasks including knowledge first")
    latest = max(found, key=lambda p: int(os.path.basename(p).split("_")[1]))
    with open(latest, encoding="utf-8") as f:
      rows = [json.loads(line) for line in f]
    answers[label] = [r for r in rows if r.get("qa") == qa][:n]
  first = next(iter(answers.values()))
  table = []
  for k, probe in enumerate(first):
    row = [_cell(probe["question"]), _cell(probe["reference"])]
    for rows in answers.values():
      r = rows[k] if k < len(rows) else None
      if r is None or r["question"] != probe["question"]:
        raise ValueError("the runs' knowledge probes differ; evaluate them with the same "
                         "eval.knowledge_people and the same encyclopedia")
      row.append(("✅ " if r["contains"] else "❌ ") + _cell(r["answer"]))
    table.append(row)
  return _md(["question", "reference", *answers], table)

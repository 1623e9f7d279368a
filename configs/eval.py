"""Scores a run's checkpoint: loss, perplexity and token accuracy, token-weighted and averaged
over documents. `--workdir` is the run to evaluate; results go to <workdir>/eval_<step>.json.

  python -m llm_jax.main --config=configs/eval.py --workdir=runs/sft
  python -m llm_jax.main --config=configs/eval.py --workdir=runs/sft --config.data.eval=my.jsonl
"""

from configs import base


def get_config(model=None):
  c = base.get_config(model)
  c.job = "eval"
  c.data.eval = ""  # "" scores the run's own eval data; or a source spec like data.train's
  return c

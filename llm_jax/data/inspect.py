"""Show how records become training examples: the rendered text and which tokens carry the loss.

  python -m llm_jax.data.inspect --config=configs/sft.py --workdir=runs/sft
  python -m llm_jax.data.inspect --config=configs/sft.py --config.data.train=alpaca.json --n=3
  python -m llm_jax.data.inspect --config=configs/pretrain.py --workdir=runs/pre --tokens
  python -m llm_jax.data.inspect --config=configs/dpo.py --workdir=runs/dpo

Reads the first `--n` records of config.data.train (or `--split=eval`) exactly as training does
(format detection, Alpaca/ShareGPT normalisation, ChatML, cleaning), and prints each with the
tokens that are trained on (loss weight > 0) highlighted: green in a terminal, «between
guillemets» otherwise. `--tokens` lists every token with its id and weight. DPO (mode dpo)
shows both sides of each pair and, when chosen + rejected exceed seq_len, where each is cut (or
that the pair is dropped) exactly as training cuts it. The tokenizer is the
run's (`--workdir`), config.data.tokenizer.path, or one trained on the data as a job would.
"""

import sys


from absl import flags
from ml_collections import config_flags

from llm_jax import console
from llm_jax.data import pipeline, preview, tokenizer as tok_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/<job>.py file; override fields "
                                          "with --config.data.train=... etc.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "", "A run directory whose tokenizer to use (optional).")
_N = flags.DEFINE_integer("n", 2, "Records to show.")
_SPLIT = flags.DEFINE_enum("split", "train", ["train", "eval"], "Which sources: data.train or data.eval.")
_TOKENS = flags.DEFINE_bool("tokens", False, "Also list every token: position, id, piece, weight.")


def main():
  run(_CONFIG.value)


def run(config) -> None:
  tok_cfg = config.data.tokenizer
  if _WORKDIR.value:
    from llm_jax import rundir  # pylint: disable=g-import-not-at-top
    run_cfg = rundir.read_config(_WORKDIR.value)
    with tok_cfg.unlocked():
      tok_cfg.path = rundir.tokenizer_path(_WORKDIR.value, run_cfg)
  tok = tok_lib.get_tokenizer(tok_cfg, None, lambda: pipeline.corpus_texts(config.data))
  color = sys.stdout.isatty()
  if config.data.mode == "dpo":
    _show_pairs(config, tok, color)
    return
  for k, (where, fmt, ids, w) in enumerate(preview.examples(config, tok, _SPLIT.value, _N.value), 1):
    print(f"--- record {k}: {where} ({fmt} format, mode {config.data.mode}): {len(ids)} tokens, "
          f"{int((w > 0).sum())} trained" + (f", seq_len {config.data.seq_len}: longer examples are "
                                             "cut" if len(ids) > config.data.seq_len + 1 else ""))
    print(preview.render(tok, ids, w, color))
    if _TOKENS.value:
      for pos, (i, wt) in enumerate(zip(ids.tolist(), w.tolist())):
        print(f"  {pos:5d} {i:7d} {tok.id_to_token(i)!r:24} weight {wt:g}")


def _show_pairs(config, tok, color: bool) -> None:
  """Both sides of each pair, and how the pair is cut when chosen + rejected exceed seq_len."""
  seq_len = config.data.seq_len
  for k, (where, sides, budgets, kept) in enumerate(
      preview.pairs(config, tok, _SPLIT.value, _N.value), 1):
    lengths = [len(ids) - 1 for ids, _ in sides]  # a side's example: its tokens after the first
    fits = sum(lengths) <= seq_len
    print(f"--- pair {k}: {where} (mode dpo): chosen {lengths[0]} + rejected {lengths[1]} = "
          f"{sum(lengths)} tokens, seq_len {seq_len}: " + (
              "fits" if fits else
              f"cut to {budgets[0]} + {budgets[1]} (the ends of the responses go)" if kept else
              f"dropped: cut to {budgets[0]} + {budgets[1]}, a side would keep no response "
              "token (raise config.data.seq_len)"))
    for name, (ids, w), budget in zip(("chosen", "rejected"), sides, budgets):
      keep = budget + 1  # the example's inputs ids[:budget] and its last target ids[budget]
      print(f"[{name}: {len(ids) - 1} tokens, {int((w[1:] > 0).sum())} trained"
            + ("" if keep >= len(ids) else
               f"; {int((w[1:keep] > 0).sum())} trained after the cut") + "]")
      print(preview.render(tok, ids[:keep], w[:keep], color))
      if keep < len(ids):
        print(f"[{name}: cut off, {len(ids) - keep} tokens]")
        print(preview.render(tok, ids[keep:], w[keep:], color))
      if _TOKENS.value:
        for pos, (i, wt) in enumerate(zip(ids.tolist(), w.tolist())):
          print(f"  {pos:5d} {i:7d} {tok.id_to_token(i)!r:24} weight {wt:g}"
                + (" (cut)" if pos >= keep else ""))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  console.cli(main)

"""How records become training examples: the first documents of a split, tokenized exactly as
training does, and a rendering with the trained tokens marked. `llm_jax.data.inspect` prints it."""

import numpy as np

from llm_jax.data import pipeline, preference


def render(tok, ids: np.ndarray, weights: np.ndarray, color: bool) -> str:
  """The decoded example with the runs of trained tokens marked."""
  on, off = ("\x1b[32m", "\x1b[0m") if color else ("«", "»")
  out, start = [], 0
  trained = weights > 0
  for k in range(1, len(ids) + 1):
    if k == len(ids) or trained[k] != trained[start]:
      text = tok.decode(ids[start:k].tolist())
      out.append(f"{on}{text}{off}" if trained[start] else text)
      start = k
  return "".join(out)


def examples(config, tok, split: str, n: int):
  """(where, ids, weights) of the first n documents of a split, rendered as training renders them
  (weights here are per token: the weight of predicting that token)."""
  data = config.data
  spec = data.train if split == "train" else data.eval
  to_examples = pipeline.ToExamples(data, tok, packing="none")
  shown = 0
  for s in pipeline.parse_spec(spec, f"config.data.{split}"):
    reader = pipeline.DocReader(s.path, data)
    for i in range(len(reader)):
      doc = reader[i]
      if "error" in doc:
        continue
      for ids, w in to_examples.token_docs(doc):
        yield reader.where(i), reader.format, ids, w
        shown += 1
        if shown >= n:
          return


def pairs(config, tok, split: str, n: int):
  """(where, [(ids, weights) chosen, (ids, weights) rejected], budgets, kept) of the first n
  preference pairs of a split, encoded and cut to config.data.seq_len as DPO training does
  (budgets: the example length each side keeps; kept False: the pair is dropped)."""
  data = config.data
  spec = data.train if split == "train" else data.eval
  shown = 0
  for s in pipeline.parse_spec(spec, f"config.data.{split}"):
    reader = pipeline.DocReader(s.path, data)
    for i in range(len(reader)):
      doc = reader[i]
      if "error" in doc or "chosen" not in doc:
        continue
      where = reader.where(i)
      sides = [preference.encode_side(tok, doc["prompt"], doc[side], where)
               for side in ("chosen", "rejected")]
      _, budgets, kept = preference.cut_pair(sides, data.seq_len)
      yield where, sides, budgets, kept
      shown += 1
      if shown >= n:
        return

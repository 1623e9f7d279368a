"""What eval tasks ask of a model: batched generation on the KV-cache generator, and batched
teacher-forced scoring (log-likelihood of marked tokens, next-token argmax), both sharded over
the run's mesh like training.

Every call has the same number of rows (the last chunk is filled with copies of its first row,
whose outputs are dropped) and lengths are powers of two of at least MIN_BUCKET, so a sweep
compiles a few programs, not one per chunk or prompt length.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_jax import sharding
from llm_jax.console import Progress
from llm_jax.infer.context import fit_ids
from llm_jax.infer.generate import bucket, Generation, Generator
from llm_jax.infer.sampling import SamplingConfig
from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder


MIN_BUCKET = 64


@dataclasses.dataclass
class Scored:
  logprob: float  # sum of log p(target) over the marked targets
  greedy: bool  # every marked target is the argmax
  argmax: np.ndarray  # [n] argmax next-token ids at every input position of the row


class ModelRunner:
  """One checkpoint's parameters on the mesh, for generation and scoring."""

  def __init__(self, params, cfg: ModelConfig, mesh, rules, score_fn, *, batch_size: int,
               context: int = 0):
    """score_fn: `make_score_fn(...)`, built once per job so checkpoints share its compilations.
    context: the run's context (rundir.context_length): a generation's prompt + answer and a
    scored row fit in it, cut from the left as chat and the server cut; 0 fits nothing."""
    self.params, self.cfg, self.mesh, self.rules = params, cfg, mesh, rules
    self.context = context
    self.cut_prompts = 0  # generation prompts cut from the left to fit the context
    self.generator = Generator(params, cfg, mesh=mesh, rules=rules, min_bucket=MIN_BUCKET)
    # Rows per scoring / generation call: a multiple of the mesh's batch shards.
    m = self.generator.batch_multiple
    self.batch_size = max(m, -(-batch_size // m) * m)
    self._score = score_fn

  def generate(self, prompts: Sequence[Sequence[int]],
               sampling: SamplingConfig | Sequence[SamplingConfig], *, stop_token_ids=(),
               decode_fn=None, desc: str = "generate") -> list[Generation]:
    per_row = ([sampling] * len(prompts) if isinstance(sampling, SamplingConfig)
               else list(sampling))
    if self.context:
      fits = [fit_ids(p, self.context, s.max_new_tokens) for p, s in zip(prompts, per_row)]
      self.cut_prompts += sum(f.cut_tokens > 0 for f in fits)
      prompts = [f.ids for f in fits]
      per_row = [dataclasses.replace(s, max_new_tokens=f.max_new_tokens)
                 for s, f in zip(per_row, fits)]
    out: list[Generation] = []
    bar = Progress(len(prompts), desc)
    for start in range(0, len(prompts), self.batch_size):
      chunk_p = list(prompts[start:start + self.batch_size])
      chunk_s = per_row[start:start + self.batch_size]
      n = len(chunk_p)
      fill = self.batch_size - n
      gens = self.generator.generate(chunk_p + [chunk_p[0]] * fill, chunk_s + [chunk_s[0]] * fill,
                                     stop_token_ids=stop_token_ids, decode_fn=decode_fn)
      out += gens[:n]
      bar.update(n)
    return out

  def score(self, rows: Sequence[tuple[Sequence[int], Sequence[float]]], *, max_len: int = 0,
            desc: str = "score") -> list[Scored]:
    """rows: (ids, weights) with weights[i] marking target ids[i] (weights[0] is ignored: the
    first token has no prediction). Each row is one document from position 0. A row longer than
    max_len + 1 keeps its last max_len + 1 tokens (the context is cut on the left, as
    lm-evaluation-harness does); max_len defaults to the runner's context."""
    max_len = max_len or self.context
    out: list[Scored] = []
    bar = Progress(len(rows), desc)
    for start in range(0, len(rows), self.batch_size):
      chunk = [(list(ids), list(w)) for ids, w in rows[start:start + self.batch_size]]
      if max_len:
        chunk = [(ids[-(max_len + 1):], w[-(max_len + 1):]) for ids, w in chunk]
      lengths = [len(ids) - 1 for ids, _ in chunk]
      if min(lengths) < 1:
        raise ValueError("a scored row needs at least 2 tokens")
      length = bucket(max(lengths), MIN_BUCKET)
      batch = {k: np.zeros((self.batch_size, length), dt) for k, dt in (
          ("inputs", np.int32), ("targets", np.int32), ("loss_weights", np.float32),
          ("segment_ids", np.int32), ("positions", np.int32))}
      for r, ((ids, w), n) in enumerate(zip(chunk, lengths)):
        batch["inputs"][r, :n] = ids[:-1]
        batch["targets"][r, :n] = ids[1:]
        batch["loss_weights"][r, :n] = w[1:]
        batch["segment_ids"][r, :n] = 1
        batch["positions"][r, :n] = np.arange(n)
      with sharding.mesh_context(self.mesh, self.rules):
        res = self._score(self.params, sharding.to_global(batch, self.mesh, self.rules))
      logprob, greedy, argmax = (np.asarray(res[k]) for k in ("logprob", "greedy", "argmax"))
      out += [Scored(float(logprob[r]), bool(greedy[r]), argmax[r, :n])
              for r, n in enumerate(lengths)]
      bar.update(len(chunk))
    return out


def make_score_fn(cfg: ModelConfig, param_shardings, mesh, rules):
  """(params, batch) -> per-row {"logprob", "greedy"} and the argmax ids, jitted and sharded."""
  model = Decoder(cfg)

  def score(params, batch):
    logits_BxLxV = model.apply({"params": params}, batch["inputs"], batch["positions"],
                               batch["segment_ids"]).astype(jnp.float32)
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV, axis=-1)
    target_logp_BxL = jnp.take_along_axis(logp_BxLxV, batch["targets"][..., None], axis=-1)[..., 0]
    w_BxL = batch["loss_weights"]
    argmax_BxL = jnp.argmax(logits_BxLxV, axis=-1).astype(jnp.int32)
    hit_BxL = (argmax_BxL == batch["targets"]) | (w_BxL == 0)
    return {"logprob": jnp.sum(target_logp_BxL * w_BxL, axis=-1),
            "greedy": jnp.all(hit_BxL, axis=-1), "argmax": argmax_BxL}

  return jax.jit(score, in_shardings=(param_shardings, sharding.row_sharding(mesh, rules)),
                 out_shardings=NamedSharding(mesh, P()))

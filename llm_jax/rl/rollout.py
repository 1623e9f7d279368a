"""The rollout stage of online RL: prompts -> G completions each from the current parameters ->
rewards -> advantages -> an ordinary batch for the GRPO objective (train/grpo.py).

It runs in the trainer's process and mesh: the Generator (infer/generate.py, the jitted KV-cache
sampler chat and serve use) reads the train state's own parameter arrays, sharded as they are,
so no weights are copied or synced (on a CPU the sampler splits the stacked layers into
per-layer views first, as it always does there). With LoRA it samples base + adapters unmerged.

Determinism: the prompts of a step come from a Grain iterator (shuffled, repeated; its position
is checkpointed with the state), and completion row r of rollout step s is sampled with the seed
hash(config.seed, s, r), so a resumed run draws exactly the completions the uninterrupted one
would have drawn. A row's tokens never depend on the other rows (sampling.row_keys).

Row layout (one completion per row, right-padded to config.data.seq_len = L):
  tokens  = prompt ids (chat template + generation prompt) + completion + <|im_end|> if it ended
  inputs  = tokens[:-1], targets = tokens[1:], loss_weights 1 on the completion's targets
  (the end token included: the model learns to stop), segment_ids 1 on tokens, 0 on padding.
A completion cut at max_new_tokens gets no end token and counts in completions/clipped_ratio.

With iterations_per_batch = mu > 1, one rollout feeds mu optimizer steps; its old log-probs are
computed once, at rollout time, with the parameters that sampled it.
"""

from __future__ import annotations

import dataclasses
import time

import grain
import jax
import numpy as np

from llm_jax import sharding
from llm_jax.data import prompts as prompts_lib
from llm_jax.infer.generate import Generator
from llm_jax.infer.sampling import SamplingConfig
from llm_jax.model.config import ModelConfig
from llm_jax.rl import accuracy, rewards as rewards_lib
from llm_jax.train import grpo


def row_seed(seed: int, step: int, row: int) -> int:
  """The sampling seed of completion `row` at rollout step `step` (31 bits, stable)."""
  return int(np.random.SeedSequence([seed, step, row]).generate_state(1)[0] & 0x7FFFFFFF)


def build_rows(prompt_ids: list, completions: list, ended: list, seq_len: int, end_id: int
               ) -> dict:
  """The batch dict of completions (see the module docstring), numpy [B, L]."""
  B = len(completions)
  out = {k: np.zeros((B, seq_len), np.int32) for k in ("inputs", "targets", "segment_ids",
                                                        "positions")}
  out["loss_weights"] = np.zeros((B, seq_len), np.float32)
  for r, (p, c, e) in enumerate(zip(prompt_ids, completions, ended)):
    tokens = list(p) + list(c) + ([end_id] if e else [])
    n = len(tokens) - 1
    if n > seq_len:
      raise ValueError(f"row {r}: {n + 1} tokens do not fit config.data.seq_len={seq_len}")
    out["inputs"][r, :n] = tokens[:-1]
    out["targets"][r, :n] = tokens[1:]
    out["segment_ids"][r, :n] = 1
    out["positions"][r, :n] = np.arange(n)
    out["loss_weights"][r, len(p) - 1:n] = 1.0
  return out


@dataclasses.dataclass
class _Timing:
  rollout_s: float = 0.0  # sampling (prefill + decode) wall time
  tokens: int = 0  # generated tokens
  train_s: float = 0.0  # train steps' wall time (loop.py times each one to completion)
  steps: int = 0  # train steps timed


class Rollout:
  """Makes each GRPO step's batch; `batch(state, step, prompt_iter)` -> (host batch, metrics)."""

  def __init__(self, config, model_cfg: ModelConfig, tok, mesh, rules):
    g = config.grpo
    self.g, self.cfg, self.tok, self.mesh, self.rules = g, model_cfg, tok, mesh, rules
    self.seed = config.seed
    self.seq_len = config.data.seq_len
    self.G = g.num_generations
    self.rows = config.data.batch_size
    self.n_prompts = self.rows // self.G
    self.mu = g.iterations_per_batch
    self.prompts = prompts_lib.load(g.prompts, tok, self.seq_len - g.max_new_tokens)
    self.rewards = rewards_lib.from_config(g)
    self.sampling = SamplingConfig(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                                   max_new_tokens=g.max_new_tokens).validate()
    self.end_id = tok.im_end_id
    self._cached = None  # (batch, metrics) of the current rollout while mu > 1
    self._timing = _Timing()
    self._last_throughput = {}
    self._eval_set = None
    self._eval_reward = rewards_lib.from_config(g, g.eval_reward).fns[0] if g.eval_prompts else None
    if self.mu > 1:
      lora = model_cfg.lora is not None
      from llm_jax.model import lora as lora_lib  # pylint: disable=g-import-not-at-top
      policy = ((lambda p, f: lora_lib.variables(model_cfg, p, f)) if lora
                else grpo.default_policy_variables)
      self._old_logps = jax.jit(grpo.policy_logps(model_cfg, g.temperature, policy))

  def iterator(self, seed: int, process_index: int = 0, process_count: int = 1):
    """Checkpointable iterator of prompt-index batches (n_prompts per step), reshuffled each
    epoch (Grain reseeds every repeat)."""
    if process_count > 1:
      raise NotImplementedError("GRPO rollouts run in one process for now (jax.process_count() "
                                f"= {process_count}); run the grpo job on one host")
    ds = (grain.MapDataset.range(len(self.prompts.ids)).shuffle(seed).repeat()
          .batch(self.n_prompts, drop_remainder=True))
    return iter(ds)

  def batch(self, state, step: int, prompt_iter) -> tuple[dict, dict]:
    """The host batch of optimizer step `step` and its rollout metrics. A new rollout every
    `mu` steps (pulling the next prompts); in between the cached one."""
    if step % self.mu and self._cached is not None:
      return self._cached
    if step % self.mu:
      raise RuntimeError(f"step {step} is inside a rollout of config.grpo.iterations_per_batch="
                         f"{self.mu} steps, and its rollout is gone (resume only from a step "
                         "that is a multiple of iterations_per_batch)")
    idx = np.asarray(next(prompt_iter)).reshape(-1)
    out = self.generate(state["params"], state.get("frozen"), idx, step)
    self._cached = out
    return out

  def generate(self, params, frozen, idx, step: int) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    lora = self.cfg.lora is not None
    gen = Generator(frozen if lora else params, self.cfg, mesh=self.mesh, rules=self.rules,
                    adapters=params if lora else None)
    rows = [int(i) for i in idx for _ in range(self.G)]  # G adjacent copies of each prompt
    per_row = [dataclasses.replace(self.sampling, seed=row_seed(self.seed, step, r))
               for r in range(len(rows))]
    gens = gen.generate([self.prompts.ids[i].tolist() for i in rows], per_row,
                        stop_token_ids=[self.end_id], decode_fn=self.tok.decode,
                        return_logprobs=True)
    t_gen = time.perf_counter() - t0
    completions = [g.text for g in gens]
    ended = [g.finish_reason == "stop" for g in gens]
    lengths = np.array([len(g.tokens) + e for g, e in zip(gens, ended)], np.float64)
    fields = {}
    for k in self.prompts.records[rows[0]]:
      if k not in ("prompt", "messages"):
        fields[k] = [self.prompts.records[i].get(k) for i in rows]
    fields["completion_tokens"] = [len(g.tokens) for g in gens]
    fields["finish_reasons"] = [g.finish_reason for g in gens]
    total, per = self.rewards([self.prompts.texts[i] for i in rows], completions, fields)
    total = np.asarray(total, np.float64)
    adv = grpo.group_advantages(total, self.G, self.g.advantage)
    batch = build_rows([self.prompts.ids[i] for i in rows], [g.tokens for g in gens], ended,
                       self.seq_len, self.end_id)
    batch["advantages"] = adv
    if self.mu > 1:
      with sharding.mesh_context(self.mesh, self.rules):
        old = self._old_logps(params, frozen if frozen is not None else {},
                              sharding.to_global(batch, self.mesh, self.rules))
      batch["old_logps"] = np.asarray(jax.device_get(old), np.float32)
    group_std = total.reshape(-1, self.G).std(axis=1, ddof=1)
    metrics = {"reward": float(total.mean()), "reward_std": float(group_std.mean()),
               "frac_reward_zero_std": float(np.mean(group_std == 0)),
               "completions/mean_length": float(lengths.mean()),
               "completions/min_length": float(lengths.min()),
               "completions/max_length": float(lengths.max()),
               "completions/clipped_ratio": float(np.mean([not e for e in ended])),
               "rollout_s": time.perf_counter() - t0}
    for name, vals in per.items():
      metrics[f"rewards/{name}/mean"] = float(np.mean(vals))
      metrics[f"rewards/{name}/std"] = float(np.std(vals))
    self.last = {"completions": completions, "rewards": total, "generations": gens,
                 "rows": rows, "batch": batch}
    self._timing.rollout_s += t_gen
    self._timing.tokens += int(sum(len(g.tokens) for g in gens))
    return batch, metrics

  def add_train_time(self, seconds: float) -> None:
    self._timing.train_s += seconds
    self._timing.steps += 1

  def throughput(self, step_time_s: float, tokens_per_step: int) -> dict:
    """Since the last call: rollout_tokens_per_s (generated tokens / sampling time),
    train_tokens_per_s (batch tokens, padding included / train step time) and the share of the
    step's wall time spent sampling. Sampling and training alternate (a rollout needs the last
    step's parameters), so the two times add up to most of a step."""
    del step_time_s
    t, self._timing = self._timing, _Timing()
    if t.steps:  # else (two reports in a row, nothing timed between): the last figures
      self._last_throughput = {
          "rollout_tokens_per_s": t.tokens / max(t.rollout_s, 1e-9),
          "train_tokens_per_s": tokens_per_step * t.steps / max(t.train_s, 1e-9),
          "rollout_time_share": t.rollout_s / max(t.rollout_s + t.train_s, 1e-9)}
    return dict(self._last_throughput)

  def has_eval(self) -> bool:
    return bool(self.g.eval_prompts)

  def evaluate(self, state) -> dict:
    """Held-out pass@1 of greedy decoding with the state's parameters (eval_accuracy): the share
    of config.grpo.eval_prompts whose reward config.grpo.eval_reward reaches 1."""
    if self._eval_set is None:
      self._eval_set = prompts_lib.load(self.g.eval_prompts, self.tok,
                                        self.seq_len - self.g.max_new_tokens,
                                        field="config.grpo.eval_prompts")
    lora = self.cfg.lora is not None
    params, frozen = state["params"], state.get("frozen")
    gen = Generator(frozen if lora else params, self.cfg, mesh=self.mesh, rules=self.rules,
                    adapters=params if lora else None)
    acc = accuracy.pass_at_1_greedy(gen, self.tok, self._eval_set, self._eval_reward,
                                    self.g.max_new_tokens)
    return {"eval_accuracy": acc}

"""Reasoning distillation: SFT on `<think>reasoning</think>answer` traces with an extra weight on
the think tags, optionally mixed with a teacher's soft targets.

Token weights. The data's loss_weights are SFT's: 1 on every assistant token (reasoning, tags,
answer) and its <|im_end|>, 0 on the prompt. Here each tag token (`config.distill.tag_tokens`,
each one token of the vocabulary, checked at start) that is trained gets `tag_weight` instead:
  w'_t = w_t * (tag_weight if target_t is a tag token else 1)
so tags in the prompt stay 0, and the weight lands on whole tag tokens, never on sub-word pieces
of a tag spelled out as text (minimind's bug).

Normalisation. The loss is normalised by the weights actually used:
  loss = sum_t w'_t * l_t / sum_t w'_t        over the whole global batch,
a weighted mean, so the loss scale (and the learning rate that suits it) does not change with
tag_weight or with how many tags a batch holds. (minimind divides by the pre-boost mask sum
sum_t w_t, which inflates the loss by up to tag_weight.) The reported `ce` and `accuracy` are
plain per-token means over the trained tokens, comparable with SFT.

Teacher (optional, `config.distill.teacher`): l_t = (1 - alpha) * CE_t + alpha * T^2 * KL_t,
KL_t = KL(softmax(teacher / T) || softmax(student / T)) at the target's position (Hinton et al.:
T^2 keeps the soft-target gradients on the scale of the hard ones). The teacher is frozen in
`frozen["teacher"]`, shares the student's tokenizer, and may have another shape. `kl` is
reported as the per-token mean KL at temperature T (without T^2).
"""

from typing import Callable

import jax
import jax.numpy as jnp

from llm_jax.model.config import ModelConfig
from llm_jax.model.decoder import Decoder
from llm_jax.train import objectives


def tag_token_ids(tok, tag_tokens: str) -> tuple[int, ...]:
  """Ids of the comma-separated tags; each must encode to exactly one token, as it does inside
  training text (SentencePiece user symbols, Hugging Face non-special added tokens)."""
  ids = []
  for tag in (t.strip() for t in tag_tokens.split(",")):
    if not tag:
      continue
    enc = tok.encode(tag)
    if len(enc) != 1:
      raise ValueError(
          f"config.distill.tag_tokens: {tag!r} encodes to {len(enc)} tokens {enc} with the "
          f"tokenizer {getattr(tok, 'source', '')}, not one, so its weight would fall on "
          "sub-word pieces. Use a tokenizer where it is a single token (llm_jax trains "
          "<think>/</think> in; a Hugging Face tokenizer.json needs it as a non-special added "
          "token), or remove it from config.distill.tag_tokens.")
    ids.append(enc[0])
  return tuple(ids)


def token_weights(targets_BxL: jax.Array, loss_weights_BxL: jax.Array, tag_ids: tuple[int, ...],
                  tag_weight: float) -> jax.Array:
  """w' = w * tag_weight on tag-token targets, w elsewhere (see the module docstring)."""
  w_BxL = loss_weights_BxL.astype(jnp.float32)
  if not tag_ids or tag_weight == 1.0:
    return w_BxL
  is_tag_BxL = jnp.isin(targets_BxL, jnp.asarray(tag_ids, targets_BxL.dtype))
  return w_BxL * jnp.where(is_tag_BxL, jnp.float32(tag_weight), jnp.float32(1.0))


def soft_kl(student_BxLxV: jax.Array, teacher_BxLxV: jax.Array, temperature: float) -> jax.Array:
  """KL(softmax(teacher / T) || softmax(student / T)) per position, [B, L]."""
  log_p_t = jax.nn.log_softmax(teacher_BxLxV.astype(jnp.float32) / temperature, axis=-1)
  log_p_s = jax.nn.log_softmax(student_BxLxV.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)


def objective(model_cfg: ModelConfig, *, tag_ids: tuple[int, ...], tag_weight: float,
              teacher_cfg: ModelConfig | None = None, alpha: float = 0.0,
              temperature: float = 1.0,
              policy_variables: Callable = lambda params, frozen: {"params": params}
              ) -> objectives.Objective:
  model = Decoder(model_cfg)
  teacher = Decoder(teacher_cfg) if teacher_cfg is not None else None

  def weights(batch):
    return token_weights(batch["targets"], batch["loss_weights"], tag_ids, tag_weight)

  def sums(params, frozen, batch, rng):
    del rng
    logits_BxLxV = model.apply(policy_variables(params, frozen), batch["inputs"],
                               batch["positions"], batch["segment_ids"]).astype(jnp.float32)
    w_BxL = weights(batch)
    trained_BxL = (batch["loss_weights"] > 0).astype(jnp.float32)
    ce_BxL = (jax.nn.logsumexp(logits_BxLxV, axis=-1) - jnp.take_along_axis(
        logits_BxLxV, batch["targets"][..., None], axis=-1)[..., 0])
    correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == batch["targets"]).astype(jnp.float32)
    out = {}
    loss_BxL = ce_BxL
    if teacher is not None:
      teacher_BxLxV = jax.lax.stop_gradient(teacher.apply(
          {"params": frozen["teacher"]}, batch["inputs"], batch["positions"],
          batch["segment_ids"]))
      kl_BxL = soft_kl(logits_BxLxV, teacher_BxLxV, temperature)
      loss_BxL = (1.0 - alpha) * ce_BxL + alpha * temperature ** 2 * kl_BxL
      out["kl"] = jnp.sum(kl_BxL * trained_BxL)
    out.update(loss=jnp.sum(loss_BxL * w_BxL), weight=jnp.sum(w_BxL),
               ce=jnp.sum(ce_BxL * trained_BxL), correct=jnp.sum(correct_BxL * trained_BxL),
               tokens=jnp.sum(trained_BxL))
    return out

  def metrics(s):
    tokens = jnp.maximum(s["tokens"], 1.0)
    m = {"loss": s["loss"] / jnp.maximum(s["weight"], 1e-9), "ce": s["ce"] / tokens,
         "perplexity": jnp.exp(jnp.minimum(s["ce"] / tokens, 700.0)),
         "accuracy": s["correct"] / tokens, "trained_tokens": s["tokens"]}
    if "kl" in s:
      m["kl"] = s["kl"] / tokens
    return m

  keys = ("loss", "weight", "ce", "correct", "tokens") + (("kl",) if teacher is not None else ())
  return objectives.Objective("distill", normalizer=lambda b: jnp.sum(weights(b)), sums=sums,
                              metrics=metrics, sum_keys=keys)

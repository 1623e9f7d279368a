"""ChatML rendering of conversations to token ids with per-token loss weights.

  <|im_start|>system\\n{content}<|im_end|>\\n
  <|im_start|>user\\n{content}<|im_end|>\\n
  <|im_start|>assistant\\n{content}<|im_end|>\\n

Each piece (control token, role header, content, trailing newline) is encoded on its own and
the ids are concatenated, so a weight always belongs to a whole token of exactly one piece:
never a sub-word that straddles a role header and the answer (minimind's tag-weighting bug),
and the generation prompt "<|im_start|>assistant\\n" is never counted as answer (MaxText's).
Weights are 1 on every assistant turn's content tokens and its closing <|im_end|>, 0 elsewhere.
"""

from __future__ import annotations

import numpy as np

from llm_jax.data.sources import RecordError
from llm_jax.data.tokenizer import IM_END, IM_START

# The Jinja form of `render_chat_text` plus the generation prompt (what `encode_chat(...,
# add_generation_prompt=True)` encodes), for tokenizers that template prompts themselves: the
# exported HF tokenizer's chat_template and the server's /tokenizer_info.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


class ChatError(RecordError):
  """A conversation cannot be rendered into a useful training example."""


def encode_chat(tok, messages: list[dict], *, add_generation_prompt: bool = False,
                where: str = "conversation") -> tuple[np.ndarray, np.ndarray]:
  """(ids[n] int32, weights[n] float32) of a ChatML conversation.

  With add_generation_prompt (inference), "<|im_start|>assistant\\n" is appended and a
  conversation without assistant turns is fine; for training, one is an error.
  """
  tok.require_chat_tokens()
  newline = tok.encode("\n")
  ids: list[int] = []
  weights: list[float] = []

  def add(piece: list[int], weight: float) -> None:
    ids.extend(piece)
    weights.extend([weight] * len(piece))

  if not messages:
    raise ChatError(f"{where}: the conversation is empty.")
  for k, message in enumerate(messages):
    role, content = message["role"], message["content"]
    if role not in ("system", "user", "assistant"):
      raise ChatError(f"{where}: message {k} has unknown role {role!r}.")
    if role == "system" and k != 0:
      raise ChatError(f"{where}: a system turn may only open the conversation (found at {k}).")
    trained = 1.0 if role == "assistant" else 0.0
    add([tok.im_start_id] + tok.encode(role + "\n"), 0.0)
    add(tok.encode(content), trained)
    add([tok.im_end_id], trained)
    add(newline, 0.0)
  if add_generation_prompt:
    add([tok.im_start_id] + tok.encode("assistant\n"), 0.0)
  # The first token is never a target (targets are ids[1:]), so it cannot carry the loss.
  elif not any(weights[1:]):
    raise ChatError(f"{where}: the conversation has no assistant turn to train on (roles: "
                    f"{[m['role'] for m in messages]}); SFT needs at least one assistant reply.")
  return np.asarray(ids, np.int32), np.asarray(weights, np.float32)


def render_chat_text(messages: list[dict]) -> str:
  """The conversation as ChatML text (for tokenizer corpora and for reading)."""
  return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)

"""The reasoning-trace format: an assistant reply is `<think>reasoning</think>answer`.

  minimind r1      the content already holds the tags: "<think>\\n...\\n</think>\\n<answer>..."
  OpenAI / Qwen3   {"role": "assistant", "content": answer, "reasoning_content": reasoning}
                   -> "<think>\\n{reasoning}\\n</think>\\n\\n{answer}" (Qwen3's rendering)

Both become one content string, so the chat template, the SFT mask and the tokenizer see one
format; <think> and </think> are single tokens of the tokenizer (tokenizer.py), which is what
lets distillation weight them (llm_jax/train/distill.py). `split` is the inverse, for showing or
hiding the reasoning of a generated reply (llm_jax/infer/reasoning.py).
"""

from __future__ import annotations

from llm_jax.data.tokenizer import END_THINK, THINK

REASONING_FIELD = "reasoning_content"


def join(reasoning: str, answer: str) -> str:
  """One assistant content from separate reasoning and answer (Qwen3's layout)."""
  if not reasoning.strip():
    return answer
  return f"{THINK}\n{reasoning.strip(chr(10))}\n{END_THINK}\n\n{answer.lstrip(chr(10))}"


def content_of(turn: dict, content: str) -> str:
  """A message's content with its `reasoning_content` (if any) joined in front."""
  reasoning = turn.get(REASONING_FIELD)
  if isinstance(reasoning, str) and reasoning.strip():
    return join(reasoning, content)
  return content


def split(text: str) -> tuple[str | None, str]:
  """(reasoning, answer) of a reply; reasoning is None when the reply has no think block.

  Handles a reply cut inside its reasoning ("<think>..." with no close: all reasoning, no answer)
  and templates that put "<think>" in the prompt, so the reply starts inside the reasoning
  ("...</think>answer").
  """
  start = text.find(THINK)
  end = text.find(END_THINK, start + len(THINK) if start >= 0 else 0)
  if start >= 0 and text[:start].strip():
    return None, text  # "<think>" quoted inside an answer, not a reasoning block
  if start < 0 and end < 0:
    return None, text
  begin = start + len(THINK) if start >= 0 else 0
  if end < 0:
    return text[begin:].strip("\n"), ""
  return text[begin:end].strip("\n"), text[end + len(END_THINK):].lstrip("\n")

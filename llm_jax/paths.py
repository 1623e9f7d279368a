"""Where llm_jax keeps what it derives once and reuses across runs (never checkpoints or data)."""

import os


def cache_dir(*parts: str) -> str:
  """$XDG_CACHE_HOME/llm_jax/<parts> (default ~/.cache/llm_jax/...); not created here."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
  return os.path.join(root, "llm_jax", *parts)

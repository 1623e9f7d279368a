"""Data: sources, chat formats and template, tokenizer, packing, the embedded default dataset.

The main entry points are re-exported lazily, so importing a light submodule (for example
llm_jax.data.hf_tokenizer) does not pull in Grain.
"""

_EXPORTS = {
    "get_tokenizer": "llm_jax.data.tokenizer",
    "make_train_iterator": "llm_jax.data.pipeline",
    "make_eval_iterator": "llm_jax.data.pipeline",
    "corpus_texts": "llm_jax.data.pipeline",
}


def __getattr__(name):
  if name in _EXPORTS:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'llm_jax.data' has no attribute {name!r}")

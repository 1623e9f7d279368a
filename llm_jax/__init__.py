"""llm_jax: train small decoder-only language models end to end in JAX.

Layers, lowest first; a module imports only its own layer and those below
(tests/test_layers.py checks it):

  L0  console.py, paths.py, fields.py   console lines, progress and user errors, the cache dir,
                                        dotted fields
      packages.py                       the packages it needs, and one line when one is missing
      xla_flags.py                      XLA flag presets per platform, checked against this jaxlib
      devices.py                        the hardware catalogue and peak FLOP/s (MFU)
      sharding.py                       the mesh, logical-axis rules, multi-host start-up
      checkpoint.py                     Orbax: the one module that touches its API
      workdir_lock.py                   one writer per run directory (or synth output)
  L1  model/                            the decoder, kernels, LoRA, init
      data/                             sources, formats, tokenizer, packing, the Grain pipeline
  L2  rundir.py                         the run directory: config, tokenizer, params, context
  L3  train/                            the loop and its objectives (pretrain, sft, dpo, distill)
      infer/                            KV-cache generation, sampling, chat sessions
  L4  eval/                             the eval job over checkpoints
      serve/                            the OpenAI-compatible server, page and arena
      convert/                          Hugging Face in and out, LoRA merge, PEFT
      plan/                             the memory and throughput planner
  L5  main.py, jobs.py, config_check.py `python -m llm_jax.main --config=configs/<job>.py`
      chat.py                           `python -m llm_jax.chat`
      notebook.py                       what the Colab notebooks call

Commands (`__main__.py`, `bench*.py`, modules defining absl flags) are leaves nothing imports;
the library never imports the top-level configs/ package.
"""

import sys as _sys

__version__ = "0.1.0"

if _sys.argv[:1] == ["-m"]:
  # `python -m llm_jax.<command>`: Python sets argv[0] to "-m" while it locates the command's
  # module, i.e. now, before the command imports anything. A missing package ends it in one line
  # that names the pip command (packages.py), not in a traceback.
  from llm_jax import packages as _packages
  _packages.check_command()

"""Generation with a KV cache, and chat over a run (layer L3: imports the foundations, model/,
data/ and rundir.py; never train/).

  generate.py   batched generation: a jitted prefill, then jitted chunks of decode steps
  sampling.py   penalties, temperature / top-k / top-p / min-p, the draw
  text.py       the incremental Detokenizer and the StopMatcher (used by the server too)
  context.py    fitting prompt + answer into the run's context, and saying what was cut
  session.py    chat and completion sessions, the terminal loop, answering a prompts file
  reasoning.py  showing or hiding <think> reasoning
  interrupt.py  Ctrl-C that stops an answer without killing the program
  bench.py      `python -m llm_jax.infer.bench` (bench_torch.py: the transformers side)
The `python -m llm_jax.chat` command is llm_jax/chat.py.
"""

"""The eval job over a run's checkpoints (layer L4: may import train/ and infer/).

  job.py          the sweep: tasks x checkpoints -> eval_<step>.json, summary, plots
  run_config.py   the run's config with the fields the user set on top
  tasks.py        the tasks: loss, rouge, repetition, knowledge, choice (each reads its data once)
  model_io.py     batched generation and scoring on the run's mesh, fitted to its context
  rouge.py, repetition.py, knowledge.py, choice.py   the metrics
  summary.py, plots.py, curves.py                    tables, PNGs, TensorBoard curves (progress
                                                     bars: console.Progress)
  figures.py      what the plots show: metric names, units, chance lines, intervals, panels
  compare.py      `python -m llm_jax.eval.compare`: runs side by side
The held-out evaluation during training is train/evaluate.py.
"""

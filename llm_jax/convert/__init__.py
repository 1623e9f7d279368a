"""Hugging Face in and out, GGUF export, LoRA merge and PEFT export (layer L4: imports the
foundations, model/, data/ and rundir.py).

  hf_config.py    HF config.json <-> ModelConfig (Llama, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE)
  hf_weights.py   the one table of parameter <-> tensor names and layouts
  hf_import.py    `python -m llm_jax.convert.hf_import`: an HF directory -> a run directory
  hf_export.py    `python -m llm_jax.convert.hf_export`: a run -> an HF directory
  sp_to_hf.py     SentencePiece .model -> tokenizer.json with the same ids
  merge_lora.py   `python -m llm_jax.convert.merge_lora`: a LoRA run -> a full run
  peft_export.py  `python -m llm_jax.convert.peft_export`: a LoRA run's adapter for PEFT
  gguf_export.py  `python -m llm_jax.convert.gguf_export`: a run -> one GGUF file + Ollama Modelfile
  gguf_vocab.py   the run's tokenizer as GGUF tokenizer metadata llama.cpp encodes with exactly
  gguf_quality.py a GGUF file's log-probs in llama.cpp next to llm_jax's (perplexity gap)
  bench_gguf.py   `python -m llm_jax.convert.bench_gguf`: size, time, perplexity, greedy per type
"""

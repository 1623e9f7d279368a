"""Data: what users bring, read lazily, tokenized and packed into the five-key batch (layer L1:
imports nothing of llm_jax but the foundations; never the model).

  files.py            a data file's kind and the checks made before any work
  sources.py          lazy random-access sources (text, JSONL, JSON arrays, Parquet, ArrayRecord,
                      TFDS), read_records for small user files, Counters for data events
  formats.py          record shapes (text, chat, Alpaca, ShareGPT, preference pairs), normalised
  reasoning.py        the <think>reasoning</think>answer format
  chat_template.py    ChatML rendering with per-token loss weights; the Jinja form for clients
  tokenizer.py        SentencePiece with ChatML special tokens; hf_tokenizer.py: tokenizer.json
  text_clean.py       pretraining text hygiene
  packing.py          Grain packers (the one file that talks to Grain's packing API)
  preference.py       DPO pairs: tokenized and packed whole
  pipeline.py         the Grain pipeline: sources -> examples -> packed batches
  preview.py          how records become examples (for inspect and the notebooks)
  builtin/            the embedded encyclopedia (`builtin:bios`...) and its post-training sets
  synth/              SFT question-answer pairs generated from documents by an LLM endpoint
  inspect.py, train_tokenizer.py, bench.py, synth/__main__.py   commands
"""

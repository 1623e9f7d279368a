r"""SFT data from documents: question-answer pairs from any OpenAI-compatible endpoint.

  python -m llm_jax.data.synth --docs=wiki.jsonl --base_url=http://127.0.0.1:8000/v1 \
      --model=Qwen2.5-7B-Instruct --out=qa.jsonl

  documents.py  read (the training readers), clean, chunk at sentence ends with overlap
  prompts.py    the prompt templates (prompts/*.txt, replaceable) and language detection
  client.py     the endpoint: openai client, retries with backoff, Retry-After, timeouts
  validate.py   JSON extraction and repair, schema, limits, grounding score, judge scores
  ledger.py     whole-line JSONL outputs and the ledger that makes a run resumable
  run.py        the run: a pool of request threads, per-chunk steps, one writer
  summary.py    what a run did (printed, and saved as JSON)
"""

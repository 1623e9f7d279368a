"""OpenAI-compatible serving of llm_jax runs: scheduler, HTTP layer, page (see __main__.py)."""

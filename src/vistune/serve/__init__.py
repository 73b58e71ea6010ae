"""Serving: an OpenAI-compatible HTTP API (`api`), dynamic batching (`batcher`), request limits
(`limits`) and a Gradio chat page (`ui`), all on the one inference engine."""

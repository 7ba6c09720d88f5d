"""Serving: the continuous-batching engine (and, next, the OpenAI-compatible HTTP layer)."""

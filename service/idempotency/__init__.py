"""Idempotency-Key on every POST (Stripe's semantics): the ASGI layer (layer.py) and its SQL (repository.py)."""

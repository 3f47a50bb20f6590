"""Hyperparameter sweeps: optuna asks, every trial is an ordinary job of the tenant, planned before it is queued."""

"""Evaluation (DESIGN.md §9): SyncNet LSE-C/LSE-D, face similarity, the AvatarWorld metrics
per clip and over time, baselines, and a report with plots. ``python -m avatarv_jax.eval``."""

"""Inference: reference clip + audio (or text) -> talking-avatar mp4 (DESIGN §8).

``generate(...)`` is the one-call API; ``Pipeline.load(...)`` + ``Pipeline.run(Job(...))`` runs
many jobs on one set of compiled models.
"""

from avatarv_jax.inference.errors import InferenceInputError
from avatarv_jax.inference.pipeline import Job, Pipeline, generate

__all__ = ["InferenceInputError", "Job", "Pipeline", "generate"]

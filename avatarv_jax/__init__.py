"""avatarv-jax: Avatar V (video-reference talking-avatar generation) in JAX and Flax NNX."""

__version__ = "0.1.0"

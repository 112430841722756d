"""Data sets and input pipelines for avatarv-jax (AvatarWorld is the built-in one)."""

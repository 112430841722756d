"""Data sets and input pipelines for avatarv-jax.

``avatarworld/``     the built-in procedural data set (shards, probe, metrics)
``pipelines/``       Grain input pipelines per training stage (``make_pipeline``)
``identity_graph``   the cross-clip identity graph behind the SFT (reference, target) pairs
``latents``          VAE pre-encoding of a shard set (``python -m avatarv_jax.data.latents``)

docs/data.md describes the batches, the config fields and the graph.
"""

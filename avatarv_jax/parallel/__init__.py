"""Meshes and logical-axis sharding: the only place that knows mesh axis names."""

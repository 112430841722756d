"""Building blocks shared by every model: dense layers, norms, RoPE, attention, embeddings."""

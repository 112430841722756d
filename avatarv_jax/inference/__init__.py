"""Inference: guided sampling of a chunk with cached reference and conditions."""

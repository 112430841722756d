"""Jitted chunk-by-chunk encode/decode, so memory stays flat however long the video.

``VAEStreamer`` splits the VAE once (``nnx.split``) and jits pure functions of
``(state, cache, chunk)``: one compile for the first chunk shape and one per later chunk
shape, no matter how many chunks. Off CPU the incoming cache buffers are donated, so do not
reuse a cache after passing it in.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import jax
from flax import nnx

from avatarv_jax.models.vae.model import CausalVideoVAE, StreamCache


class VAEStreamer:
    """Compiled streaming encoder/decoder for one ``CausalVideoVAE``."""

    def __init__(self, vae: CausalVideoVAE):
        self.config = vae.config
        self._graphdef, self._state = nnx.split(vae)
        donate = (1,) if jax.default_backend() != "cpu" else ()
        self.trace_counts = {"encode": 0, "decode": 0}  # how many times each was compiled
        self._encode = jax.jit(self._encode_impl, donate_argnums=donate)
        self._decode = jax.jit(self._decode_impl, donate_argnums=donate)

    def _encode_impl(self, state, cache, frames, rng):
        self.trace_counts["encode"] += 1  # runs only while tracing
        return nnx.merge(self._graphdef, state).encode_chunk(cache, frames, rng=rng)

    def _decode_impl(self, state, cache, latents):
        self.trace_counts["decode"] += 1
        return nnx.merge(self._graphdef, state).decode_chunk(cache, latents)

    # ---- one chunk ------------------------------------------------------------------------

    def init_encode_cache(self) -> StreamCache:
        return StreamCache("encode")

    def init_decode_cache(self) -> StreamCache:
        return StreamCache("decode")

    def encode_chunk(self, cache: StreamCache, frames: jax.Array, *,
                     rng: jax.Array | None = None) -> tuple[StreamCache, jax.Array]:
        """See ``CausalVideoVAE.encode_chunk`` for the frame-count rule."""
        return self._encode(self._state, cache, frames, rng)

    def decode_chunk(self, cache: StreamCache, latents: jax.Array
                     ) -> tuple[StreamCache, jax.Array]:
        return self._decode(self._state, cache, latents)

    # ---- whole videos, compiled -------------------------------------------------------------

    def encode(self, video: jax.Array, *, rng: jax.Array | None = None) -> jax.Array:
        return self.encode_chunk(self.init_encode_cache(), video, rng=rng)[1]

    def decode(self, latents: jax.Array) -> jax.Array:
        return self.decode_chunk(self.init_decode_cache(), latents)[1]

    # ---- streams ----------------------------------------------------------------------------

    def encode_stream(self, video: jax.Array | Iterable[jax.Array], *, chunk_frames: int = 4,
                      rng: jax.Array | None = None) -> Iterator[jax.Array]:
        """Yield latent chunks of a video.

        An array ``[B, 1 + 4k, H, W, 3]`` is cut into its first frame, then chunks of
        ``chunk_frames`` (a multiple of the temporal stride) with a shorter last one. An
        iterable of arrays (e.g. frames read from a file) is used chunk by chunk as given.
        """
        st = self.config.temporal_stride
        if isinstance(video, jax.Array) or hasattr(video, "shape"):
            if chunk_frames < 1 or chunk_frames % st:
                raise ValueError(f"chunk_frames must be a positive multiple of {st}, got "
                                 f"{chunk_frames}")
            self.config.latent_frames(video.shape[1])  # checks the 1 + 4k rule
            bounds = [0, 1, *range(1 + chunk_frames, video.shape[1], chunk_frames),
                      video.shape[1]]
            chunks = (video[:, a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a)
        else:
            chunks = iter(video)
        cache = self.init_encode_cache()
        for i, frames in enumerate(chunks):
            key = None if rng is None else jax.random.fold_in(rng, i)
            cache, latents = self.encode_chunk(cache, frames, rng=key)
            yield latents

    def decode_stream(self, latents: jax.Array | Iterable[jax.Array], *,
                      chunk_latents: int = 1) -> Iterator[jax.Array]:
        """Yield video chunks: ``chunk_latents`` latent frames at a time (or chunks as given)."""
        if isinstance(latents, jax.Array) or hasattr(latents, "shape"):
            if chunk_latents < 1:
                raise ValueError(f"chunk_latents must be >= 1, got {chunk_latents}")
            t = latents.shape[1]
            chunks = (latents[:, a:a + chunk_latents] for a in range(0, t, chunk_latents))
        else:
            chunks = iter(latents)
        cache = self.init_decode_cache()
        for z in chunks:
            cache, frames = self.decode_chunk(cache, z)
            yield frames

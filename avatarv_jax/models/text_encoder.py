"""Encoder-only T5 with the umT5 layout: the text encoder of Wan 2.1 (umT5-XXL).

Per layer: RMSNorm -> self-attention (no biases, *no* 1/sqrt(d) scaling, a learned relative
position bias) -> residual; RMSNorm -> gated-GELU FFN -> residual. A final RMSNorm closes the
stack. umT5 learns a relative position bias in every layer (``position_bias_per_layer=True``);
classic T5 learns one in layer 0 and shares it (``False``). Outputs at padded positions are
zero because Wan zero-pads its text embeddings to a fixed length.

Layers are stacked (leading ``layers`` axis) and run with ``jax.lax.scan``.

Parameter names and the weights they come from, as ``ours <- HF UMT5EncoderModel | Wan 2.1
models_t5_umt5-xxl-enc``. ``{i}`` is the layer index (stacked along our axis 0); ``T`` marks a
torch ``(out, in)`` weight transposed to our ``(in, out)`` kernel; ``B = encoder.block.{i}.layer``:

    embedding              <- shared.weight (= encoder.embed_tokens.weight) | token_embedding.weight
    layers.attn_norm.scale <- B.0.layer_norm.weight                  | blocks.{i}.norm1.weight
    layers.attn.q.kernel   <- B.0.SelfAttention.q.weight        T    | blocks.{i}.attn.q.weight
    layers.attn.k.kernel   <- B.0.SelfAttention.k.weight        T    | blocks.{i}.attn.k.weight
    layers.attn.v.kernel   <- B.0.SelfAttention.v.weight        T    | blocks.{i}.attn.v.weight
    layers.attn.o.kernel   <- B.0.SelfAttention.o.weight        T    | blocks.{i}.attn.o.weight
    layers.attn.rel_bias   <- B.0.SelfAttention.relative_attention_bias.weight  (buckets, heads)
                              | blocks.{i}.pos_embedding.embedding.weight
    layers.ffn_norm.scale  <- B.1.layer_norm.weight                  | blocks.{i}.norm2.weight
    layers.ffn.wi_0.kernel <- B.1.DenseReluDense.wi_0.weight    T    | blocks.{i}.ffn.gate.0.weight
    layers.ffn.wi_1.kernel <- B.1.DenseReluDense.wi_1.weight    T    | blocks.{i}.ffn.fc1.weight
    layers.ffn.wo.kernel   <- B.1.DenseReluDense.wo.weight      T    | blocks.{i}.ffn.fc2.weight
    final_norm.scale       <- encoder.final_layer_norm.weight        | norm.weight
    rel_bias (shared mode) <- encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                              | pos_embedding.embedding.weight

``hf_umt5_names(cfg)`` returns the HF column as data for the weight importer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avatarv_jax.layers.initializers import make_param, normal
from avatarv_jax.layers.linear import Dense
from avatarv_jax.layers.norms import RMSNorm


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """Sizes of an encoder-only T5; ``dtype`` is the compute dtype (params stay fp32)."""

    vocab_size: int
    d_model: int
    d_kv: int
    num_heads: int
    d_ff: int
    num_layers: int
    num_buckets: int = 32
    max_distance: int = 128
    position_bias_per_layer: bool = True
    eps: float = 1e-6
    dtype: Any = jnp.float32
    remat: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TextEncoderConfig.{name} must be a positive int, got {value!r}")
        if self.num_buckets < 4 or self.num_buckets % 2:
            raise ValueError("TextEncoderConfig.num_buckets must be even and >= 4 (half per "
                             f"direction, half of those exact), got {self.num_buckets}")
        if self.max_distance <= self.num_buckets // 4:
            raise ValueError(f"TextEncoderConfig.max_distance ({self.max_distance}) must exceed "
                             f"the exact-bucket range num_buckets // 4 ({self.num_buckets // 4})")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def umt5_xxl(cls, **overrides) -> "TextEncoderConfig":
        """umT5-XXL encoder as used by Wan 2.1 (about 5.7B parameters)."""
        base = dict(vocab_size=256384, d_model=4096, d_kv=64, num_heads=64, d_ff=10240,
                    num_layers=24)
        return cls(**{**base, **overrides})

    @classmethod
    def tiny(cls, **overrides) -> "TextEncoderConfig":
        """A byte-vocabulary toy for tests and CPU demos."""
        base = dict(vocab_size=259, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2)
        return cls(**{**base, **overrides})


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
    """T5 bidirectional bucket of ``key_pos - query_pos``, int32 ``[q_len, k_len]``.

    Half the buckets are for keys after the query. Within a half, distances below
    ``num_buckets // 4`` get their own bucket and longer ones share log-spaced buckets up to
    ``max_distance``. The log is taken in float32 like the PyTorch originals, so imported
    weights see the same buckets. Computed on the host: lengths are static.
    """
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    half = num_buckets // 2
    buckets = np.where(rel > 0, half, 0)
    dist = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):  # log(0) only where the exact branch is taken
        scaled = (np.log(dist.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact))
                  * np.float32(half - max_exact))
    large = max_exact + np.where(dist >= max_exact, scaled, 0).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (buckets + np.where(dist < max_exact, dist, large)).astype(np.int32)


def position_bias(table: jnp.ndarray, buckets: np.ndarray) -> jnp.ndarray:
    """Look up a ``(num_buckets, heads)`` bias table: fp32 ``[heads, q_len, k_len]``."""
    return jnp.take(table.astype(jnp.float32), jnp.asarray(buckets), axis=0).transpose(2, 0, 1)


def _bias_table(cfg: TextEncoderConfig, rngs: nnx.Rngs) -> nnx.Param:
    return make_param(rngs, normal(cfg.d_model ** -0.5), (cfg.num_buckets, cfg.num_heads),
                      (None, "heads"))


class T5Attention(nnx.Module):
    """Unscaled multi-head self-attention with an additive relative position bias.

    T5 folds the 1/sqrt(d_kv) into the query weights at init, so imported weights expect none.
    """

    def __init__(self, cfg: TextEncoderConfig, *, own_bias: bool, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.d_kv = cfg.d_kv
        self.dtype = cfg.dtype
        d, inner = cfg.d_model, cfg.inner_dim

        def proj(n_in, n_out, std, axes):
            return Dense(n_in, n_out, axes=axes, use_bias=False, dtype=cfg.dtype,
                         kernel_init=normal(std), rngs=rngs)

        self.q = proj(d, inner, (d * cfg.d_kv) ** -0.5, ("embed", "heads"))
        self.k = proj(d, inner, d ** -0.5, ("embed", "heads"))
        self.v = proj(d, inner, d ** -0.5, ("embed", "heads"))
        self.o = proj(inner, d, inner ** -0.5, ("heads", "embed"))
        self.rel_bias = _bias_table(cfg, rngs) if own_bias else None

    def __call__(self, x: jnp.ndarray, bias: jnp.ndarray, key_mask: jnp.ndarray) -> jnp.ndarray:
        b, n, _ = x.shape
        heads = lambda t: t.reshape(b, n, self.num_heads, self.d_kv)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) + bias[None]
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, self.num_heads * self.d_kv)
        return self.o(out)


class GatedGeluFFN(nnx.Module):
    """``wo(gelu_tanh(wi_0 x) * wi_1 x)``: T5 v1.1's gated-GELU ("gelu_new") feed-forward."""

    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        self.wi_0 = Dense(d, f, axes=("embed", "mlp"), use_bias=False, dtype=cfg.dtype,
                          kernel_init=normal(d ** -0.5), rngs=rngs)
        self.wi_1 = Dense(d, f, axes=("embed", "mlp"), use_bias=False, dtype=cfg.dtype,
                          kernel_init=normal(d ** -0.5), rngs=rngs)
        self.wo = Dense(f, d, axes=("mlp", "embed"), use_bias=False, dtype=cfg.dtype,
                        kernel_init=normal(f ** -0.5), rngs=rngs)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class T5Block(nnx.Module):
    """One pre-norm encoder layer."""

    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.eps, rngs=rngs)
        self.attn = T5Attention(cfg, own_bias=cfg.position_bias_per_layer, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.eps, rngs=rngs)
        self.ffn = GatedGeluFFN(cfg, rngs=rngs)

    def __call__(self, x: jnp.ndarray, buckets: np.ndarray, shared_bias: jnp.ndarray | None,
                 key_mask: jnp.ndarray) -> jnp.ndarray:
        if self.attn.rel_bias is not None:
            bias = position_bias(self.attn.rel_bias[...], buckets)
        else:
            bias = shared_bias
        x = x + self.attn(self.attn_norm(x), bias, key_mask)
        return x + self.ffn(self.ffn_norm(x))


def _stacked_blocks(cfg: TextEncoderConfig, rngs: nnx.Rngs) -> T5Block:
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(r):
        return T5Block(cfg, rngs=r)

    return make(rngs)


class T5Encoder(nnx.Module):
    """Token ids + validity mask -> per-token embeddings ``[B, L, d_model]`` (zero at pads)."""

    def __init__(self, cfg: TextEncoderConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embedding = make_param(rngs, normal(1.0), (cfg.vocab_size, cfg.d_model),
                                    ("vocab", "embed"))
        self.rel_bias = None if cfg.position_bias_per_layer else _bias_table(cfg, rngs)
        self.layers = _stacked_blocks(cfg, rngs)
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.eps, rngs=rngs)

    def __call__(self, ids: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
        cfg = self.cfg
        if ids.ndim != 2:
            raise ValueError(f"ids must be [batch, length], got shape {ids.shape}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"ids must be integer token ids, got dtype {ids.dtype}")
        if mask is None:
            mask = jnp.ones(ids.shape, dtype=bool)
        if mask.shape != ids.shape:
            raise ValueError(f"mask shape {mask.shape} does not match ids shape {ids.shape}")
        mask = mask.astype(bool)

        # ids >= vocab_size read NaN rows (jnp.take's fill mode), not a silently clamped row.
        x = jnp.take(self.embedding[...], ids, axis=0).astype(cfg.dtype)
        buckets = relative_position_buckets(ids.shape[1], ids.shape[1], cfg.num_buckets,
                                            cfg.max_distance)
        shared = None if self.rel_bias is None else position_bias(self.rel_bias[...], buckets)

        graphdef, state = nnx.split(self.layers)

        def step(h, layer_state):
            return nnx.merge(graphdef, layer_state)(h, buckets, shared, mask), None

        if cfg.remat:
            step = jax.checkpoint(step)
        x, _ = jax.lax.scan(step, x, state)
        x = self.final_norm(x)
        return jnp.where(mask[..., None], x, jnp.zeros((), x.dtype))


@nnx.jit
def _encode_jit(encoder: T5Encoder, ids: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    return encoder(ids, mask)


def encode_text(encoder: T5Encoder, tokenizer, texts: list[str],
                max_length: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Tokenise and encode ``texts``: ``(embeddings [B, max_length, d], mask [B, max_length])``.

    A fixed ``max_length`` (Wan uses 512) keeps one compiled program for every prompt.
    """
    if tokenizer.vocab_size > encoder.cfg.vocab_size:
        raise ValueError(f"tokenizer vocabulary ({tokenizer.vocab_size}) is larger than the "
                         f"encoder's embedding table ({encoder.cfg.vocab_size})")
    ids, mask = tokenizer.encode(texts, max_length)
    return _encode_jit(encoder, jnp.asarray(ids), jnp.asarray(mask)), jnp.asarray(mask)


def hf_umt5_names(cfg: TextEncoderConfig) -> dict[str, tuple[str, bool]]:
    """Our parameter path -> (HF ``UMT5EncoderModel`` state-dict name, transpose?).

    Names with ``{i}`` are per layer and stack along our leading ``layers`` axis.
    """
    blk = "encoder.block.{i}.layer"
    names = {
        "embedding": ("shared.weight", False),
        "layers.attn_norm.scale": (f"{blk}.0.layer_norm.weight", False),
        "layers.attn.q.kernel": (f"{blk}.0.SelfAttention.q.weight", True),
        "layers.attn.k.kernel": (f"{blk}.0.SelfAttention.k.weight", True),
        "layers.attn.v.kernel": (f"{blk}.0.SelfAttention.v.weight", True),
        "layers.attn.o.kernel": (f"{blk}.0.SelfAttention.o.weight", True),
        "layers.ffn_norm.scale": (f"{blk}.1.layer_norm.weight", False),
        "layers.ffn.wi_0.kernel": (f"{blk}.1.DenseReluDense.wi_0.weight", True),
        "layers.ffn.wi_1.kernel": (f"{blk}.1.DenseReluDense.wi_1.weight", True),
        "layers.ffn.wo.kernel": (f"{blk}.1.DenseReluDense.wo.weight", True),
        "final_norm.scale": ("encoder.final_layer_norm.weight", False),
    }
    bias = "0.SelfAttention.relative_attention_bias.weight"
    if cfg.position_bias_per_layer:
        names["layers.attn.rel_bias"] = (f"{blk}.{bias}", False)
    else:
        names["rel_bias"] = (f"encoder.block.0.layer.{bias}", False)
    return names

"""The Avatar V diffusion transformer: REF and GEN segments, four token streams, SRA.

One sample is two segments (DESIGN §3), each laid out frame by frame with ``T`` tokens per
latent frame: the frame's ``rows * cols`` video patches and, when the motion stream is on, one
motion token.

- REF: reference latents (+ motion, + the reference clip's audio), always at the clean
  timestep, temporal RoPE positions ``ref_time_offset + i``.
- GEN: prefix frames (clean) and noisy frames (+ motion, + audio), a timestep per latent
  frame, temporal positions ``0 .. F-1`` (chunk-local).

Every block: adaLN-modulated self-attention through the SRA dispatcher, text cross-attention
(GEN video tokens only), frame-aligned audio cross-attention (each latent frame's tokens attend
to its own audio window), FFN. With no REF, no audio and no motion it is the Wan 2.1 T2V block:
same norms and eps, qk RMS-norm across heads, modulation table, RoPE split, cross-attention.

The DiT runs in two ways that give the same GEN outputs (DESIGN §3.2):
joint (``dit(gen, ref)``, used in training) and cached (``dit.encode_reference(ref)`` once,
``dit.encode_conditions(...)`` once per chunk, then ``dit(gen, ref_cache=, cond_cache=)`` for
every sampling step).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx, struct

from avatarv_jax.kernels.sra_layout import SRALayout
from avatarv_jax.layers.attention import (AttentionProjections, dot_product_attention,
                                          sparse_reference_attention)
from avatarv_jax.layers.embeddings import TimestepMLP, sinusoidal_embedding
from avatarv_jax.layers.initializers import make_param, normal, zeros
from avatarv_jax.layers.linear import Dense
from avatarv_jax.layers.norms import LayerNorm
from avatarv_jax.layers.rope import rope_tables, segment_positions
from avatarv_jax.models.audio_windows import latent_audio_windows, window_size
from avatarv_jax.models.motion import TEMPORAL_STRIDE, MotionEncoder, MotionHead
from avatarv_jax.parallel.sharding import constrain

REMAT_POLICIES = ("none", "full", "dots", "attention")
# Primitives whose outputs the "attention" remat policy keeps: the forward kernels of the SRA
# implementations (Pallas kernels; cuDNN's fused attention). Their outputs and softmax
# statistics are what the backward kernels need besides q, k, v, which are cheap to recompute.
ATTENTION_KERNEL_PRIMITIVES = ("pallas_call", "dot_product_attention_fwd",
                               "dot_product_attention_fwd_wrapper")


def save_attention_kernel_outputs(prim, *_, **__) -> bool:
    """Remat policy: recompute everything except the attention kernels' forward outputs.

    Full remat runs the attention forward twice per step; at long REF+GEN sequences that is
    the most expensive op of the layer, while its outputs (o and the log-sum-exp) are small.
    """
    return prim.name in ATTENTION_KERNEL_PRIMITIVES

_HIDDEN_AXES = ("activation_batch", None, None, "activation_embed")  # hidden states [B, F, T, D]
GUIDANCE_FEATURE_SCALE = 100.0   # scales of ~1-10 spread over the sinusoids like timesteps


class GuidanceEmbedder(nnx.Module):
    """(text scale, audio scale) -> an embedding added to the timestep embedding (guidance
    distillation, DESIGN §5 stage 4). Its output layer starts at zero, so a student made from
    its teacher by parameter surgery starts as exactly the teacher's conditional model."""

    def __init__(self, freq_dim: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.freq_dim = freq_dim
        self.linear_1 = Dense(2 * freq_dim, dim, axes=(None, "embed"), dtype=dtype, rngs=rngs)
        self.linear_2 = Dense(dim, dim, axes=("embed", "mlp"), kernel_init=zeros, dtype=dtype,
                              rngs=rngs)

    def __call__(self, scales: jax.Array) -> jax.Array:
        feats = sinusoidal_embedding(scales.astype(jnp.float32) * GUIDANCE_FEATURE_SCALE,
                                     self.freq_dim)                          # [B, 2, freq]
        feats = feats.reshape(*feats.shape[:-2], 2 * self.freq_dim)
        return self.linear_2(jax.nn.silu(self.linear_1(feats)))


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Sizes and switches of the DiT; the defaults are Wan 2.1 T2V 1.3B."""

    dim: int = 1536
    num_layers: int = 30
    num_heads: int = 12
    ffn_dim: int = 8960
    in_channels: int = 16
    out_channels: int = 16
    cond_channels: int = 0          # SR refiner: channels of the upsampled base latent
    patch_size: tuple = (1, 2, 2)
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    rope_theta: float = 10000.0
    audio_dim: int = 0              # width of audio features; 0 = no audio cross-attention
    audio_context: int = 2          # video frames of audio context either side of a latent frame
    motion_dim: int = 0             # per-video-frame motion vector; 0 = no motion stream
    ref_time_offset: int = 64       # temporal RoPE position of REF frame 0
    ref_window: int = 0             # REF frames a REF frame sees either side; -1 = all
    gen_window: int = -1            # GEN frames a GEN frame sees either side; -1 = all
    attention_impl: str = "xla"
    guidance_embed: bool = False    # guidance-distilled student: the scales enter like the timestep
    dtype: str = "float32"          # compute dtype; parameters are fp32
    remat_policy: str = "none"

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if tuple(self.patch_size)[0] != 1:
            raise ValueError(f"patch_size {self.patch_size}: temporal patch must be 1 "
                             "(one token group per latent frame)")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r} not in {REMAT_POLICIES}")

    @classmethod
    def from_config(cls, cfg) -> "DiTConfig":
        """Build from an ml_collections ConfigDict (or dict) with the same field names."""
        values = dict(cfg)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown DiT config fields: {sorted(unknown)}")
        if "patch_size" in values:
            values["patch_size"] = tuple(values["patch_size"])
        return cls(**values)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def packed_motion_dim(self) -> int:
        return TEMPORAL_STRIDE * self.motion_dim

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)


@struct.dataclass
class GenInputs:
    """The GEN segment of a chunk.

    latents: [B, F, H, W, C] (clean prefix frames, then noisy frames).
    timesteps: [B, F] in [0, 1000]; 0 for clean prefix frames.
    text: [B, L, text_dim] text embeddings (zero-padded, as in Wan); unused with a cond cache.
    motion: [B, F, 4 * motion_dim] packed motion (``models.motion.pack_motion``).
    audio: [B, 1 + 4(F-1), audio_dim] features per video frame of the chunk.
    audio_mask: [B] 1 = use audio, 0 = drop it (guidance / condition dropout).
    cond_latents: [B, F, H, W, cond_channels] upsampled base latents (SR refiner).
    guidance: [B, 2] (text scale, audio scale) for a guidance-distilled DiT
        (``guidance_embed``): one pass gives the guided velocity of those scales.
    """

    latents: jax.Array
    timesteps: jax.Array
    text: jax.Array | None = None
    motion: jax.Array | None = None
    audio: jax.Array | None = None
    audio_mask: jax.Array | None = None
    cond_latents: jax.Array | None = None
    guidance: jax.Array | None = None


@struct.dataclass
class RefInputs:
    """The REF segment: reference latents [B, F, H, W, C] and their motion/audio.

    valid_frames: [B] int, GEN sees only REF frames below it (0 drops the reference).
    """

    latents: jax.Array
    motion: jax.Array | None = None
    audio: jax.Array | None = None
    audio_mask: jax.Array | None = None
    cond_latents: jax.Array | None = None
    valid_frames: jax.Array | None = None


@struct.dataclass
class RefCache:
    """Per-layer REF keys and values, [layers, B, ref_len, heads, head_dim]: REF tokens never
    see GEN and are always clean, so they depend on the reference alone."""

    keys: jax.Array
    values: jax.Array
    valid_frames: jax.Array | None = None


@struct.dataclass
class CondCache:
    """Per-layer cross-attention keys/values of the text (once per video) and of the chunk's
    audio windows (once per chunk), reused by every sampling step."""

    text_keys: jax.Array
    text_values: jax.Array
    audio_keys: jax.Array | None = None      # [layers, B, F, W, heads, head_dim]
    audio_values: jax.Array | None = None
    audio_window_mask: jax.Array | None = None   # [F, W]
    audio_mask: jax.Array | None = None          # [B]


@struct.dataclass
class _Segment:
    """What every layer needs of one segment besides its hidden state."""

    temb: jax.Array          # [B, F, D] timestep embedding
    mod: jax.Array           # [B, F, 6, D] timestep projection for the blocks
    cos: jax.Array           # [S, head_dim / 2]
    sin: jax.Array
    audio_keys: jax.Array | None = None
    audio_values: jax.Array | None = None
    audio_window_mask: jax.Array | None = None
    audio_mask: jax.Array | None = None


def patchify(x: jax.Array, patch: tuple[int, int]) -> jax.Array:
    """[B, F, H, W, C] -> [B, F, (H/ph)*(W/pw), ph*pw*C], patches in raster order."""
    b, f, h, w, c = x.shape
    ph, pw = patch
    if h % ph or w % pw:
        raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {ph}x{pw}")
    x = x.reshape(b, f, h // ph, ph, w // pw, pw, c).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, f, (h // ph) * (w // pw), ph * pw * c)


def unpatchify(x: jax.Array, grid: tuple[int, int], patch: tuple[int, int]) -> jax.Array:
    """Inverse of ``patchify``: [B, F, rows*cols, ph*pw*C] -> [B, F, H, W, C]."""
    b, f = x.shape[:2]
    (rows, cols), (ph, pw) = grid, patch
    c = x.shape[-1] // (ph * pw)
    x = x.reshape(b, f, rows, cols, ph, pw, c).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, f, rows * ph, cols * pw, c)


class TextProjection(nnx.Module):
    """Text embeddings -> model width: Linear, GELU (tanh), Linear (Wan's text embedder)."""

    def __init__(self, text_dim: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.linear_1 = Dense(text_dim, dim, axes=(None, "embed"), dtype=dtype, rngs=rngs)
        self.linear_2 = Dense(dim, dim, axes=("embed", "mlp"), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=True))


class DiTBlock(nnx.Module):
    """One transformer block; names follow diffusers' ``WanTransformerBlock`` where they exist."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d, dt = cfg.dim, cfg.compute_dtype
        self.cfg = cfg
        self.norm1 = LayerNorm(d, eps=cfg.eps, affine=False)
        self.attn1 = AttentionProjections(d, cfg.num_heads, eps=cfg.eps, dtype=dt, rngs=rngs)
        self.norm2 = LayerNorm(d, eps=cfg.eps, affine=True, rngs=rngs)
        self.attn2 = AttentionProjections(d, cfg.num_heads, eps=cfg.eps, dtype=dt, rngs=rngs)
        if cfg.audio_dim:
            self.norm_audio = LayerNorm(d, eps=cfg.eps, affine=True, rngs=rngs)
            # Zero output projection: adding audio to a trained T2V model starts as a no-op.
            self.attn_audio = AttentionProjections(d, cfg.num_heads, eps=cfg.eps, dtype=dt,
                                                   zero_out=True, rngs=rngs)
        self.norm3 = LayerNorm(d, eps=cfg.eps, affine=False)
        self.ffn_in = Dense(d, cfg.ffn_dim, axes=("embed", "mlp"), dtype=dt, rngs=rngs)
        self.ffn_out = Dense(cfg.ffn_dim, d, axes=("mlp", "embed"), dtype=dt, rngs=rngs)
        self.scale_shift_table = make_param(rngs, normal(d ** -0.5), (6, d), (None, "embed"))

    # -- pieces ---------------------------------------------------------------------------
    def _modulation(self, seg: _Segment):
        mod = self.scale_shift_table[...][None, None] + seg.mod.astype(jnp.float32)
        return [mod[:, :, i, None, :] for i in range(6)]      # each [B, F, 1, D]

    def self_attention_inputs(self, h, seg: _Segment):
        """Modulated norm, then q and (k, v) of the segment, flattened to [B, S, H, Dh]."""
        shift, scale = self._modulation(seg)[:2]
        x = (self.norm1(h) * (1 + scale) + shift).astype(self.cfg.compute_dtype)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        rope = (seg.cos, seg.sin)
        return self.attn1.query(x, rope), self.attn1.key_value(x, rope)

    def text_kv(self, text_emb):
        return self.attn2.key_value(text_emb.astype(self.cfg.compute_dtype))

    def audio_kv(self, audio_tokens):
        """audio_tokens [B, F, W, D] -> keys, values [B, F, W, H, Dh]."""
        return self.attn_audio.key_value(audio_tokens.astype(self.cfg.compute_dtype))

    def finish(self, h, attn_out, seg: _Segment, text_kv, text_token_mask):
        """Everything after self-attention: gated residual, cross-attentions, FFN."""
        cfg = self.cfg
        b, f, t, d = h.shape
        _, _, gate, c_shift, c_scale, c_gate = self._modulation(seg)
        h = h + self.attn1.output(attn_out).reshape(b, f, t, d).astype(jnp.float32) * gate
        h = constrain(h, _HIDDEN_AXES)

        if text_kv is not None:
            x = self.norm2(h).astype(cfg.compute_dtype).reshape(b, f * t, d)
            o = dot_product_attention(self.attn2.query(x), *text_kv)
            o = self.attn2.output(o).reshape(b, f, t, d).astype(jnp.float32)
            h = h + o * text_token_mask[None, None, :, None]

        if cfg.audio_dim and seg.audio_keys is not None:
            x = self.norm_audio(h).astype(cfg.compute_dtype).reshape(b * f, t, d)
            keys = seg.audio_keys.reshape(b * f, *seg.audio_keys.shape[2:])
            values = seg.audio_values.reshape(b * f, *seg.audio_values.shape[2:])
            key_mask = jnp.broadcast_to(seg.audio_window_mask[None], (b,) + seg.audio_window_mask
                                        .shape).reshape(b * f, -1)
            o = dot_product_attention(self.attn_audio.query(x), keys, values, key_mask)
            o = self.attn_audio.output(o).reshape(b, f, t, d).astype(jnp.float32)
            h = h + o * seg.audio_mask.astype(jnp.float32)[:, None, None, None]

        x = (self.norm3(h) * (1 + c_scale) + c_shift).astype(cfg.compute_dtype)
        x = constrain(x, _HIDDEN_AXES)
        y = self.ffn_out(jax.nn.gelu(self.ffn_in(x), approximate=True))
        return constrain(h + y.astype(jnp.float32) * c_gate, _HIDDEN_AXES)


class DiT(nnx.Module):
    """The Avatar V DiT (base model, or the SR refiner when ``cond_channels > 0``)."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, dt = cfg.dim, cfg.compute_dtype
        _, ph, pw = cfg.patch_size
        self.patch_embedding = Dense(ph * pw * cfg.in_channels, d, axes=(None, "embed"), dtype=dt,
                                     rngs=rngs)
        self.time_embedder = TimestepMLP(cfg.freq_dim, d, dtype=dt, rngs=rngs)
        self.time_proj = Dense(d, 6 * d, axes=("embed", "mlp"), dtype=dt, rngs=rngs)
        self.text_embedder = TextProjection(cfg.text_dim, d, dtype=dt, rngs=rngs)
        if cfg.guidance_embed:
            self.guidance_embedder = GuidanceEmbedder(cfg.freq_dim, d, dtype=dt, rngs=rngs)

        # Modules Avatar V adds to the Wan 2.1 layout.
        self.ref_embedding = make_param(rngs, zeros, (d,), ("embed",))
        if cfg.cond_channels:
            # Channel-wise concatenation of [noisy, upsampled base] before the patch embedding
            # equals the sum of two embeddings; a separate one keeps the Wan weights importable.
            self.cond_embedding = Dense(ph * pw * cfg.cond_channels, d, axes=(None, "embed"),
                                        use_bias=False, kernel_init=zeros, dtype=dt, rngs=rngs)
        if cfg.audio_dim:
            self.audio_proj = Dense(cfg.audio_dim, d, axes=(None, "embed"), dtype=dt, rngs=rngs)
            self.audio_pos = make_param(rngs, normal(0.02), (window_size(cfg.audio_context), d),
                                        (None, "embed"))
        if cfg.motion_dim:
            self.motion_encoder = MotionEncoder(cfg.packed_motion_dim, d, dtype=dt, rngs=rngs)
            self.motion_head = MotionHead(d, cfg.packed_motion_dim, eps=cfg.eps, dtype=dt,
                                          rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r):
            return DiTBlock(cfg, rngs=r)

        self.blocks = make_blocks(rngs)
        self.norm_out = LayerNorm(d, eps=cfg.eps, affine=False)
        self.scale_shift_table = make_param(rngs, normal(d ** -0.5), (2, d), (None, "embed"))
        self.proj_out = Dense(d, ph * pw * cfg.out_channels, axes=("embed", None), dtype=dt,
                              rngs=rngs)

    # -- segment preparation ----------------------------------------------------------------
    def _grid(self, latents) -> tuple[int, int]:
        _, ph, pw = self.cfg.patch_size
        return latents.shape[2] // ph, latents.shape[3] // pw

    def _tokens(self, latents, motion, cond_latents, is_ref: bool):
        """Patch (+ cond) embedding and the motion token: [B, F, T, D] in fp32."""
        patch = tuple(self.cfg.patch_size[1:])
        h = self.patch_embedding(patchify(latents, patch)).astype(jnp.float32)
        if self.cfg.cond_channels:
            if cond_latents is not None:
                h = h + self.cond_embedding(patchify(cond_latents, patch)).astype(jnp.float32)
            elif not is_ref:
                raise ValueError("the SR refiner needs GenInputs.cond_latents")
        if motion is not None:
            if not self.cfg.motion_dim:
                raise ValueError("motion was given but the config has motion_dim = 0")
            if motion.shape[:2] != latents.shape[:2] or motion.shape[-1] != self.cfg.packed_motion_dim:
                raise ValueError(f"motion has shape {motion.shape}; expected "
                                 f"{latents.shape[:2] + (self.cfg.packed_motion_dim,)}")
            h = jnp.concatenate([h, self.motion_encoder(motion).astype(jnp.float32)], axis=2)
        if is_ref:
            h = h + self.ref_embedding[...]
        return constrain(h, _HIDDEN_AXES)

    def _timestep_embeddings(self, timesteps, guidance=None):
        temb = self.time_embedder(timesteps)                                  # [B, F, D]
        if guidance is not None:
            temb = temb + self.guidance_embedder(guidance)[:, None, :].astype(temb.dtype)
        # Gathered before the reshape: with the 6*D axis tensor-sharded, XLA:CPU (jax 0.10)
        # gave wrong time-embedder gradients under (data 2, fsdp 2, tensor 2).
        mod = constrain(self.time_proj(jax.nn.silu(temb)),
                        ("activation_batch", None, "activation_embed"))
        mod = mod.reshape(*mod.shape[:-1], 6, self.cfg.dim)
        return (constrain(temb, ("activation_batch", None, "activation_embed")),
                constrain(mod, ("activation_batch", None, None, "activation_embed")))

    def _guidance(self, gen: GenInputs, batch: int):
        """The [B, 2] guidance scales of a guidance-distilled DiT (checked), else None."""
        if not self.cfg.guidance_embed:
            if gen.guidance is not None:
                raise ValueError("GenInputs.guidance was given but the config has "
                                 "guidance_embed = False (only a guidance-distilled DiT takes it)")
            return None
        if gen.guidance is None:
            raise ValueError("this DiT is guidance-distilled (guidance_embed = True): pass "
                             "GenInputs.guidance = [B, 2] (text scale, audio scale)")
        if gen.guidance.shape != (batch, 2):
            raise ValueError(f"GenInputs.guidance has shape {gen.guidance.shape}; expected "
                             f"{(batch, 2)} (text scale, audio scale)")
        return gen.guidance

    def _rope(self, frame_positions, grid, motion_token: bool):
        pos = segment_positions(frame_positions, grid, motion_token)
        return rope_tables(pos, self.cfg.head_dim, self.cfg.rope_theta)

    def _audio_tokens(self, audio, num_frames: int):
        """Per-video-frame features -> projected windows [B, F, W, D] and mask [F, W]."""
        expected = 1 + TEMPORAL_STRIDE * (num_frames - 1)
        if audio.shape[1] != expected or audio.shape[-1] != self.cfg.audio_dim:
            raise ValueError(f"audio has shape {audio.shape}; expected [B, {expected}, "
                             f"{self.cfg.audio_dim}] for {num_frames} latent frames")
        windows, mask = latent_audio_windows(self.audio_proj(audio), self.cfg.audio_context)
        windows = windows + self.audio_pos[...].astype(windows.dtype)
        return constrain(windows, ("activation_batch", None, None, "activation_embed")), mask

    def _per_layer(self, fn, *args):
        """Run ``fn(block, *args)`` for every block; outputs stacked on a leading layer axis."""
        graphdef, state = nnx.split(self.blocks)

        def body(carry, layer_state):
            return carry, fn(nnx.merge(graphdef, layer_state), *args)

        return jax.lax.scan(body, None, state)[1]

    def _audio_kv(self, audio, audio_mask, num_frames, batch):
        if not self.cfg.audio_dim or audio is None:
            return None, None, None, None
        tokens, window_mask = self._audio_tokens(audio, num_frames)
        keys, values = self._per_layer(lambda blk, a: blk.audio_kv(a), tokens)
        if audio_mask is None:
            audio_mask = jnp.ones((batch,), jnp.float32)
        return keys, values, window_mask, audio_mask

    # -- public API ---------------------------------------------------------------------------
    def encode_conditions(self, text, audio=None, audio_mask=None, *,
                          num_frames: int | None = None) -> CondCache:
        """Per-layer text and (chunk) audio cross-attention keys/values (DESIGN §3.2 level two)."""
        # Activations that enter a layer scan are pinned to the batch sharding: left to
        # propagation, XLA:CPU (jax 0.10) partitioned value_and_grad of the scan wrongly.
        text_emb = constrain(self.text_embedder(text),
                             ("activation_batch", None, "activation_embed"))
        text_k, text_v = self._per_layer(lambda blk, t: blk.text_kv(t), text_emb)
        if audio is not None and num_frames is None:
            num_frames = 1 + (audio.shape[1] - 1) // TEMPORAL_STRIDE
        ak, av, wmask, amask = self._audio_kv(audio, audio_mask, num_frames, text.shape[0])
        return CondCache(text_k, text_v, ak, av, wmask, amask)

    def encode_reference(self, ref: RefInputs) -> RefCache:
        """Run the REF stream alone once; its per-layer keys/values serve every step and chunk."""
        ref_seg, h = self._reference_segment(ref)
        layout = SRALayout(ref_frames=h.shape[1], gen_frames=0, tokens_per_frame=h.shape[2],
                           ref_window=self.cfg.ref_window, gen_window=self.cfg.gen_window)

        def layer(block, h, layer_xs):
            seg = ref_seg.replace(audio_keys=layer_xs[0], audio_values=layer_xs[1])
            q, (k, v) = block.self_attention_inputs(h, seg)
            o, _ = sparse_reference_attention(q, k, v, None, None, None, layout=layout,
                                              impl=self.cfg.attention_impl)
            return block.finish(h, o, seg, None, None), (k, v)

        audio_xs = (ref_seg.audio_keys, ref_seg.audio_values)
        _, (keys, values) = self._scan_layers(layer, h, audio_xs)
        return RefCache(keys, values, ref.valid_frames)

    def __call__(self, gen: GenInputs, ref: RefInputs | None = None, *,
                 ref_cache: RefCache | None = None,
                 cond_cache: CondCache | None = None,
                 return_ref_hidden: bool = False) -> dict[str, jax.Array]:
        """Velocity of the GEN segment: {'video': [B, F, H, W, C], 'motion': [B, F, 4M]}.

        ``return_ref_hidden`` adds the REF stream's last hidden state [B, F_ref, T, D] (joint
        mode), which lets tests check that REF never sees GEN.

        Joint mode: ``ref`` given (or neither ``ref`` nor ``ref_cache``: no reference).
        Cached mode: ``ref_cache`` from ``encode_reference`` and/or ``cond_cache`` from
        ``encode_conditions``; both modes give the same outputs.
        """
        cfg = self.cfg
        if ref is not None and ref_cache is not None:
            raise ValueError("pass either ref (joint forward) or ref_cache (cached), not both")
        b, f = gen.latents.shape[:2]
        if gen.timesteps.shape != (b, f):
            raise ValueError(f"timesteps have shape {gen.timesteps.shape}; expected {(b, f)} "
                             "(one per latent frame)")
        grid = self._grid(gen.latents)
        h_gen = self._tokens(gen.latents, gen.motion, gen.cond_latents, is_ref=False)
        t = h_gen.shape[2]
        if cond_cache is None:
            if gen.text is None:
                raise ValueError("GenInputs.text is required without a cond_cache")
            cond_cache = self.encode_conditions(gen.text, gen.audio, gen.audio_mask,
                                                num_frames=f)
        temb, mod = self._timestep_embeddings(gen.timesteps, self._guidance(gen, b))
        cos, sin = self._rope(np.arange(f), grid, gen.motion is not None)
        gen_seg = _Segment(temb, mod, cos, sin, None, None, cond_cache.audio_window_mask,
                           cond_cache.audio_mask)
        text_token_mask = jnp.asarray(np.arange(t) < grid[0] * grid[1], jnp.float32)

        ref_seg, h_ref, valid = None, None, None
        if ref is not None:
            ref_seg, h_ref = self._reference_segment(ref, expected_tokens=t)
            ref_frames, valid = h_ref.shape[1], ref.valid_frames
        elif ref_cache is not None:
            ref_frames, valid = ref_cache.keys.shape[2] // t, ref_cache.valid_frames
        else:
            ref_frames = 0
        layout = SRALayout(ref_frames=ref_frames, gen_frames=f, tokens_per_frame=t,
                           ref_window=cfg.ref_window, gen_window=cfg.gen_window)

        def layer(block, carry, xs):
            h_gen, h_ref = carry
            seg_g = gen_seg.replace(audio_keys=xs["gen_ak"], audio_values=xs["gen_av"])
            q_gen, (k_gen, v_gen) = block.self_attention_inputs(h_gen, seg_g)
            q_ref = None
            if h_ref is not None:
                seg_r = ref_seg.replace(audio_keys=xs["ref_ak"], audio_values=xs["ref_av"])
                q_ref, (k_ref, v_ref) = block.self_attention_inputs(h_ref, seg_r)
            elif "ref_k" in xs:
                k_ref, v_ref = xs["ref_k"], xs["ref_v"]
            else:
                k_ref = v_ref = jnp.zeros((b, 0) + k_gen.shape[2:], k_gen.dtype)
            o_ref, o_gen = sparse_reference_attention(
                q_ref, k_ref, v_ref, q_gen, k_gen, v_gen, layout=layout, ref_valid_frames=valid,
                impl=cfg.attention_impl)
            h_gen = block.finish(h_gen, o_gen, seg_g, (xs["text_k"], xs["text_v"]),
                                 text_token_mask)
            if h_ref is not None:
                h_ref = block.finish(h_ref, o_ref, seg_r, None, None)
            return (h_gen, h_ref), None

        xs = {"text_k": cond_cache.text_keys, "text_v": cond_cache.text_values,
              "gen_ak": cond_cache.audio_keys, "gen_av": cond_cache.audio_values}
        if ref_seg is not None:
            xs.update(ref_ak=ref_seg.audio_keys, ref_av=ref_seg.audio_values)
        if ref_cache is not None:
            xs.update(ref_k=ref_cache.keys, ref_v=ref_cache.values)
        (h_gen, h_ref), _ = self._scan_layers(layer, (h_gen, h_ref), xs)
        out = self._head(h_gen, temb, grid, gen.motion is not None)
        if return_ref_hidden:
            out["ref_hidden"] = h_ref
        return out

    # -- internals ---------------------------------------------------------------------------
    def _reference_segment(self, ref: RefInputs, expected_tokens: int | None = None):
        h = self._tokens(ref.latents, ref.motion, ref.cond_latents, is_ref=True)
        b, f, t = h.shape[:3]
        if expected_tokens is not None and t != expected_tokens:
            raise ValueError(f"REF frames have {t} tokens but GEN frames have {expected_tokens}: "
                             "reference and target must share latent size and motion stream")
        temb, mod = self._timestep_embeddings(jnp.zeros((b, f), jnp.float32))
        frames = self.cfg.ref_time_offset + np.arange(f)
        cos, sin = self._rope(frames, self._grid(ref.latents), ref.motion is not None)
        ak, av, wmask, amask = self._audio_kv(ref.audio, ref.audio_mask, f, b)
        return _Segment(temb, mod, cos, sin, ak, av, wmask, amask), h

    def _scan_layers(self, layer_fn, carry, xs):
        """Scan ``layer_fn(block, carry, xs_l)`` over the stacked blocks, with remat."""
        graphdef, state = nnx.split(self.blocks)

        def body(carry, inputs):
            layer_state, layer_xs = inputs
            return layer_fn(nnx.merge(graphdef, layer_state), carry, layer_xs)

        policy = self.cfg.remat_policy
        if policy == "full":
            body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
        elif policy == "dots":
            body = jax.checkpoint(
                body, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
        elif policy == "attention":
            body = jax.checkpoint(body, policy=save_attention_kernel_outputs)
        return jax.lax.scan(body, carry, (state, xs))

    def _head(self, h, temb, grid, has_motion: bool) -> dict[str, jax.Array]:
        cfg = self.cfg
        hw = grid[0] * grid[1]
        mod = self.scale_shift_table[...][None, None] + temb[:, :, None, :].astype(jnp.float32)
        shift, scale = mod[:, :, 0:1], mod[:, :, 1:2]
        x = self.norm_out(h[:, :, :hw]) * (1 + scale) + shift
        video = self.proj_out(x.astype(cfg.compute_dtype)).astype(jnp.float32)
        out = {"video": unpatchify(video, grid, tuple(cfg.patch_size[1:]))}
        if has_motion:
            out["motion"] = self.motion_head(h[:, :, hw], temb).astype(jnp.float32)
        return out

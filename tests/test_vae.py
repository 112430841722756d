"""The causal video VAE: shapes, causality, streaming == whole video, frame-count rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from avatarv_jax.io.wan_vae import expected_shapes
from avatarv_jax.models.vae import CausalVideoVAE, StreamCache, VAEConfig, VAEStreamer
from avatarv_jax.models.vae.blocks import CausalConv3d

H = W = 16  # 2x2 latents: small enough for 2 CPU cores, big enough for attention to matter


def random_vae(cfg: VAEConfig, seed: int = 0) -> CausalVideoVAE:
    """A VAE with random weights drawn by numpy: building one with jax.random compiles an
    initialiser per parameter shape, which takes tens of seconds on 2 shared cores."""
    vae = nnx.eval_shape(lambda: CausalVideoVAE(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    filled = []
    for path, var in nnx.to_flat_state(nnx.state(vae, nnx.Param)):
        shape = var.shape
        if path[-1] == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
        elif path[-1] == "gamma":
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            value = 0.02 * rng.standard_normal(shape)
        filled.append((path, var.replace(value=jnp.asarray(value, jnp.float32))))
    nnx.update(vae, nnx.from_flat_state(filled))
    return vae


@pytest.fixture(scope="module")
def vae():
    return random_vae(VAEConfig.tiny())


@pytest.fixture(scope="module")
def streamer(vae):
    return VAEStreamer(vae)  # shared, so compiled chunk shapes are reused across tests


@pytest.fixture(scope="module")
def video():
    return jax.random.uniform(jax.random.key(1), (1, 13, H, W, 3), minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def latents(streamer, video):
    return streamer.encode(video)


def _max_diff(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def test_wan21_config_sizes():
    cfg = VAEConfig.wan21()
    assert (cfg.spatial_stride, cfg.temporal_stride) == (8, 4)
    assert cfg.latent_frames(81) == 21 and cfg.video_frames(21) == 81
    shapes = expected_shapes(cfg)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 126_892_531
    assert shapes["encoder.conv_in.weight"] == (96, 3, 3, 3, 3)
    assert shapes["decoder.up_blocks.1.resnets.0.conv1.weight"] == (384, 192, 3, 3, 3)
    assert shapes["decoder.up_blocks.0.upsamplers.0.time_conv.weight"] == (768, 384, 3, 1, 1)
    assert shapes["encoder.mid_block.attentions.0.to_qkv.weight"] == (1152, 384, 1, 1)


def test_tiny_s4_halves_the_spatial_stride_only():
    cfg = VAEConfig.tiny_s4()
    assert (cfg.spatial_stride, cfg.temporal_stride) == (4, 4)
    assert (cfg.z_dim, cfg.base_dim) == (VAEConfig.tiny().z_dim, VAEConfig.tiny().base_dim)
    vae = CausalVideoVAE(cfg, rngs=nnx.Rngs(0))
    latents = vae.encode(jnp.zeros((1, 5, 32, 32, 3)))
    assert latents.shape == (1, 2, 8, 8, 16)
    assert vae.decode(latents).shape == (1, 5, 32, 32, 3)


def test_config_errors():
    with pytest.raises(ValueError, match="one flag per downsampling stage"):
        VAEConfig(dim_mult=(1, 2), temporal_downsample=(True, True))
    with pytest.raises(ValueError, match="latents_mean has 16 entries, z_dim is 4"):
        VAEConfig(z_dim=4)
    with pytest.raises(ValueError, match="1 \\+ 4\\*k frames, got 80"):
        VAEConfig.wan21().latent_frames(80)


def test_constructor_params_are_fp32_with_logical_axes():
    # The whole tree abstractly (building it for real compiles one initialiser per shape) ...
    vae = nnx.eval_shape(lambda: CausalVideoVAE(VAEConfig.tiny(), rngs=nnx.Rngs(0)))
    k = vae.encoder.conv_in.kernel
    assert k.get_metadata()["out_sharding"] == (None, None, None, "conv_in", "conv_out")
    assert k.shape == (3, 3, 3, 3, 8) and k.dtype == jnp.float32
    qkv = vae.decoder.mid_block.attentions[0].to_qkv.kernel
    assert qkv.get_metadata()["out_sharding"] == ("conv_in", "conv_out")
    assert vae.encoder.norm_out.gamma.get_metadata()["out_sharding"] == ("conv_out",)
    # ... and one layer for real: initialised with fan-in scaling, bias zero.
    conv = CausalConv3d(4, 8, rngs=nnx.Rngs(0))
    assert 0.5 < float(jnp.std(conv.kernel[...])) * np.sqrt(4 * 27) < 1.5
    assert float(jnp.abs(conv.bias[...]).max()) == 0.0


def test_shapes_and_range(streamer, video, latents):
    assert latents.shape == (1, 4, H // 8, W // 8, 16) and latents.dtype == jnp.float32
    out = streamer.decode(latents)
    assert out.shape == video.shape
    assert float(jnp.max(jnp.abs(out))) <= 1.0
    assert np.isfinite(np.asarray(out)).all()


def test_batch_items_are_independent(streamer, video, latents):
    pair = jnp.concatenate([video[:, :5], -video[:, :5]])
    z = streamer.encode(pair)
    assert z.shape == (2, 2, H // 8, W // 8, 16)
    assert _max_diff(z[:1], latents[:, :2]) <= 1e-5
    assert _max_diff(z[1:], z[:1]) > 1e-3


def test_encoder_is_causal(streamer, video, latents):
    # Latent frame j sees video frames up to 4j: changing frames 5.. leaves latents 0 and 1.
    changed = video.at[:, 5:].set(-video[:, 5:])
    z = streamer.encode(changed)
    assert _max_diff(z[:, :2], latents[:, :2]) <= 1e-6
    assert _max_diff(z[:, 2:], latents[:, 2:]) > 1e-3


def test_decoder_is_causal(streamer, latents):
    out = streamer.decode(latents)
    changed = streamer.decode(latents.at[:, 2:].add(1.0))
    assert _max_diff(changed[:, :5], out[:, :5]) <= 1e-6  # latent 2 starts at frame 5
    assert _max_diff(changed[:, 5:], out[:, 5:]) > 1e-3


@pytest.mark.parametrize("sizes", [(1, 1, 1, 1), (3, 1), (1, 3)])
def test_streaming_decode_equals_whole(streamer, latents, sizes):
    whole = streamer.decode(latents)
    cache, parts, start = streamer.init_decode_cache(), [], 0
    for n in sizes:
        cache, frames = streamer.decode_chunk(cache, latents[:, start:start + n])
        assert frames.shape[1] == (1 + 4 * (n - 1) if start == 0 else 4 * n)
        parts.append(frames)
        start += n
    assert _max_diff(jnp.concatenate(parts, axis=1), whole) <= 1e-5


@pytest.mark.parametrize("sizes", [(1, 4, 4, 4), (5, 8)])
def test_streaming_encode_equals_whole(streamer, video, latents, sizes):
    cache, parts, start = streamer.init_encode_cache(), [], 0
    for n in sizes:
        cache, z = streamer.encode_chunk(cache, video[:, start:start + n])
        assert z.shape[1] == (1 + (n - 1) // 4 if start == 0 else n // 4)
        parts.append(z)
        start += n
    assert _max_diff(jnp.concatenate(parts, axis=1), latents) <= 1e-5


def test_stream_generators_compile_once_per_chunk_shape(streamer, video, latents):
    z = jnp.concatenate(list(streamer.encode_stream(video[:, :9], chunk_frames=4)), axis=1)
    assert _max_diff(z, latents[:, :3]) <= 1e-5  # causal: a prefix encodes to a prefix
    frames = jnp.concatenate(list(streamer.decode_stream(z, chunk_latents=1)), axis=1)
    assert frames.shape == (1, 9, H, W, 3)
    # Longer streams with the same chunk shapes compile nothing new.
    counts = dict(streamer.trace_counts)
    longer = jnp.concatenate(list(streamer.encode_stream(video, chunk_frames=4)), axis=1)
    chunks = iter([latents[:, :1], latents[:, 1:2], latents[:, 2:3], latents[:, 3:]])
    again = jnp.concatenate(list(streamer.decode_stream(chunks)), axis=1)
    assert streamer.trace_counts == counts
    assert _max_diff(longer, latents) <= 1e-5
    assert _max_diff(again, streamer.decode(latents)) <= 1e-5
    with pytest.raises(ValueError, match="chunk_frames must be a positive multiple of 4"):
        next(streamer.encode_stream(video, chunk_frames=6))


def test_frame_count_rules(vae, streamer, video):
    with pytest.raises(ValueError, match="first encode chunk must have 1 \\+ 4\\*k frames.*got 4"):
        streamer.encode_chunk(streamer.init_encode_cache(), video[:, :4])
    cache, _ = streamer.encode_chunk(streamer.init_encode_cache(), video[:, :1])
    with pytest.raises(ValueError, match="positive multiple of 4 frames, got 3"):
        streamer.encode_chunk(cache, video[:, 1:4])
    with pytest.raises(ValueError, match="1 \\+ 4\\*k frames.*got 12"):
        vae.encode(video[:, :12])
    with pytest.raises(ValueError, match="multiples of 8, got 12x16"):
        vae.encode(video[:, :1, :12])
    with pytest.raises(ValueError, match="video must be \\[B, T, H, W, 3\\]"):
        vae.encode(video[..., :2])
    with pytest.raises(ValueError, match="batch/height/width \\(2, 16, 16\\).*\\(1, 16, 16\\)"):
        streamer.encode_chunk(cache, jnp.concatenate([video[:, 1:5]] * 2))
    with pytest.raises(TypeError, match="decode_chunk needs the cache.*'encode' cache"):
        streamer.decode_chunk(cache, jnp.zeros((1, 1, 2, 2, 16)))
    with pytest.raises(ValueError, match="latents must be \\[B, T, h, w, 16\\]"):
        vae.decode(jnp.zeros((1, 1, 2, 2, 4)))
    with pytest.raises(ValueError, match="needs an rng key"):
        vae.encode(video[:, :1], sample=True)


def test_sample_is_mean_plus_scaled_noise(vae, streamer, video, latents):
    frames = video[:, :1]
    moments = nnx.jit(lambda m, f: m.encode_moments_chunk(StreamCache("encode"), f)[1:])
    mean, logvar = moments(vae, frames)
    assert _max_diff(vae.normalize_latents(mean), latents[:, :1]) <= 1e-5
    key = jax.random.key(3)
    z = streamer.encode(frames, rng=key)
    eps = jax.random.normal(key, mean.shape)
    assert _max_diff(z, vae.normalize_latents(mean + jnp.exp(0.5 * logvar) * eps)) <= 1e-5
    assert _max_diff(z, latents[:, :1]) > 1e-3


def test_latent_normalisation_round_trip():
    cfg = VAEConfig.tiny(latents_mean=tuple(np.linspace(-1, 1, 16)),
                         latents_std=tuple(np.linspace(0.5, 2, 16)))
    vae = nnx.eval_shape(lambda: CausalVideoVAE(cfg, rngs=nnx.Rngs(0)))
    mu = jax.random.normal(jax.random.key(0), (1, 2, 2, 2, 16))
    z = vae.normalize_latents(mu)
    assert _max_diff(z[..., 3], (mu[..., 3] - cfg.latents_mean[3]) / cfg.latents_std[3]) < 1e-6
    assert _max_diff(vae.denormalize_latents(z), mu) < 1e-5


def test_bf16_compute_close_to_fp32(video, latents):
    bf = random_vae(VAEConfig.tiny(dtype=jnp.bfloat16))  # same weights as the fp32 fixture
    assert bf.encoder.conv_in.kernel[...].dtype == jnp.float32  # params stay fp32
    z = VAEStreamer(bf).encode(video[:, :5])
    assert z.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(latents[:, :2])))
    assert 0.0 < _max_diff(z, latents[:, :2]) < 0.05 * scale

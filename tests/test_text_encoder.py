"""The umT5-layout text encoder against an independent numpy implementation of T5's math."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from avatarv_jax.models.text_encoder import (T5Encoder, TextEncoderConfig, encode_text,
                                             hf_umt5_names, relative_position_buckets)
from avatarv_jax.models.tokenizer import ByteTokenizer


# ----------------------------------------------------------------------------- numpy reference

def ref_bucket(rel: int, num_buckets: int, max_distance: int) -> int:
    """T5 bidirectional bucket of one relative position, written as scalar code."""
    half = num_buckets // 2
    offset = half if rel > 0 else 0
    n = abs(rel)
    exact = half // 2
    if n < exact:
        return offset + n
    # float32 arithmetic, as in the PyTorch reference implementations.
    v = np.float32(np.log(np.float32(n) / np.float32(exact)))
    v = v / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
    return offset + min(exact + int(v), half - 1)


def ref_rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def ref_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def ref_encoder(p, cfg, ids, mask):
    """Float64 T5 encoder over a dict of numpy params laid out like HF (per layer lists)."""
    b, n = ids.shape
    h, dk = cfg.num_heads, cfg.d_kv
    table_idx = np.array([[ref_bucket(k - q, cfg.num_buckets, cfg.max_distance)
                           for k in range(n)] for q in range(n)])
    x = p["embedding"][ids]
    for i in range(cfg.num_layers):
        table = p["rel_bias"][i] if cfg.position_bias_per_layer else p["rel_bias"][0]
        bias = np.transpose(table[table_idx], (2, 0, 1))  # [h, q, k]
        y = ref_rmsnorm(x, p["attn_norm"][i], cfg.eps)
        q = (y @ p["q"][i]).reshape(b, n, h, dk)
        k = (y @ p["k"][i]).reshape(b, n, h, dk)
        v = (y @ p["v"][i]).reshape(b, n, h, dk)
        s = np.einsum("bqhd,bkhd->bhqk", q, k) + bias[None]
        s = np.where(mask[:, None, None, :], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = s / s.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, n, h * dk)
        x = x + o @ p["o"][i]
        y = ref_rmsnorm(x, p["ffn_norm"][i], cfg.eps)
        x = x + (ref_gelu_tanh(y @ p["wi_0"][i]) * (y @ p["wi_1"][i])) @ p["wo"][i]
    x = ref_rmsnorm(x, p["final_norm"], cfg.eps)
    return x * mask[..., None]


def numpy_params(model):
    """The model's parameters as float64 numpy, keyed the way ref_encoder reads them."""
    L = model.layers
    f = lambda v: np.asarray(v[...], np.float64)
    p = {"embedding": f(model.embedding), "final_norm": f(model.final_norm.scale),
         "attn_norm": f(L.attn_norm.scale), "ffn_norm": f(L.ffn_norm.scale),
         "q": f(L.attn.q.kernel), "k": f(L.attn.k.kernel), "v": f(L.attn.v.kernel),
         "o": f(L.attn.o.kernel), "wi_0": f(L.ffn.wi_0.kernel), "wi_1": f(L.ffn.wi_1.kernel),
         "wo": f(L.ffn.wo.kernel)}
    p["rel_bias"] = (f(L.attn.rel_bias) if model.cfg.position_bias_per_layer
                     else f(model.rel_bias)[None])
    return p


def randomize(model, seed):
    """Perturb every parameter (norm scales away from 1, larger position biases) so that each
    one shows in the output, while keeping activations at their trained-model scale."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(np.asarray(x) * (1.0 + 0.3 * rng.standard_normal(x.shape)), x.dtype)
              for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
    table = model.layers.attn.rel_bias if model.rel_bias is None else model.rel_bias
    table[...] = 4.0 * table[...]
    return model


def tokens(seed, b, n, vocab=259):
    return np.random.default_rng(seed).integers(3, vocab, size=(b, n)).astype(np.int32)


# ----------------------------------------------------------------------------- tests

@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 20), (8, 12)])
def test_relative_position_buckets_match_scalar_reference(num_buckets, max_distance):
    n = 300
    got = relative_position_buckets(n, n, num_buckets, max_distance)
    want = np.array([[ref_bucket(k - q, num_buckets, max_distance) for k in range(n)]
                     for q in range(n)])
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int32 and got.min() >= 0 and got.max() == num_buckets - 1


def test_relative_position_buckets_known_values():
    # 32 buckets / 128: keys before the query use 0..15, after use 16..31; 8 exact distances.
    b = relative_position_buckets(1, 300, 32, 128)[0]
    assert b[0] == 0 and b[1] == 17 and b[7] == 23 and b[8] == 24 and b[16] == 26
    assert b[299] == 31
    back = relative_position_buckets(300, 1, 32, 128)[:, 0]  # key at 0: rel = -q
    assert back[1] == 1 and back[8] == 8 and back[16] == 10 and back[299] == 15


def test_rectangular_buckets_use_key_minus_query():
    got = relative_position_buckets(3, 5, 32, 128)
    want = np.array([[ref_bucket(k - q, 32, 128) for k in range(5)] for q in range(3)])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("per_layer", [True, False])
def test_forward_matches_numpy_reference(per_layer):
    cfg = TextEncoderConfig.tiny(position_bias_per_layer=per_layer)
    model = randomize(T5Encoder(cfg, nnx.Rngs(1)), seed=2)
    ids = tokens(3, 2, 24)
    mask = np.ones_like(ids, dtype=bool)
    mask[1, 15:] = False
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    want = ref_encoder(numpy_params(model), cfg, ids, mask)
    assert got.shape == (2, 24, cfg.d_model) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_padding_invariance_and_zero_padded_outputs():
    cfg = TextEncoderConfig.tiny()
    model = randomize(T5Encoder(cfg, nnx.Rngs(0)), seed=5)
    ids = tokens(7, 1, 9)
    short = np.asarray(model(jnp.asarray(ids), jnp.ones((1, 9), bool)))
    padded_ids = np.concatenate([ids, np.zeros((1, 7), np.int32)], axis=1)
    padded_mask = np.arange(16)[None] < 9
    long = np.asarray(model(jnp.asarray(padded_ids), jnp.asarray(padded_mask)))
    np.testing.assert_allclose(long[:, :9], short, atol=1e-5, rtol=0)
    assert np.all(long[:, 9:] == 0.0)
    # Garbage (not pad) ids under the mask must not leak into valid outputs either.
    junk = padded_ids.copy()
    junk[:, 9:] = tokens(8, 1, 7)
    other = np.asarray(model(jnp.asarray(junk), jnp.asarray(padded_mask)))
    np.testing.assert_allclose(other, long, atol=1e-5, rtol=0)


def test_batch_rows_are_independent():
    model = randomize(T5Encoder(TextEncoderConfig.tiny(), nnx.Rngs(0)), seed=9)
    ids = tokens(10, 2, 12)
    mask = np.arange(12)[None] < np.array([[12], [5]])
    both = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    second = np.asarray(model(jnp.asarray(ids[1:, :5]), jnp.ones((1, 5), bool)))
    np.testing.assert_allclose(both[1, :5], second[0], atol=1e-5, rtol=0)


def test_per_layer_bias_differs_from_shared_bias():
    """Same weights; layer 1 reading its own bias changes the output, a copy of layer 0's
    bias reproduces the shared (classic T5) model exactly."""
    shared_cfg = TextEncoderConfig.tiny(position_bias_per_layer=False)
    per_cfg = TextEncoderConfig.tiny(position_bias_per_layer=True)
    shared = randomize(T5Encoder(shared_cfg, nnx.Rngs(0)), seed=11)
    per = T5Encoder(per_cfg, nnx.Rngs(0))
    assert shared.layers.attn.rel_bias is None and shared.rel_bias.shape == (32, 4)
    assert per.rel_bias is None and per.layers.attn.rel_bias.shape == (2, 32, 4)

    # Copy every shared-model weight into the per-layer model (all but the bias tables).
    src = dict(nnx.state(shared, nnx.Param).flat_state())
    common = {path: src[path] for path, _ in nnx.state(per, nnx.Param).flat_state()
              if path in src}
    assert len(common) == len(src) - 1
    nnx.update(per, nnx.State.from_flat_path(common))
    table = shared.rel_bias[...]
    other = table + jax.random.normal(jax.random.key(3), table.shape)
    ids = jnp.asarray(tokens(12, 2, 20))
    mask = jnp.ones(ids.shape, bool)
    want = np.asarray(shared(ids, mask))

    def run(layer1_table):
        per.layers.attn.rel_bias[...] = jnp.stack([table, layer1_table])
        return np.asarray(per(ids, mask))

    np.testing.assert_allclose(run(table), want, atol=1e-6, rtol=0)
    assert np.abs(run(other) - want).max() > 1e-2


def test_remat_and_jit_give_same_output():
    cfg = TextEncoderConfig.tiny()
    ids = jnp.asarray(tokens(4, 2, 10))
    mask = jnp.ones(ids.shape, bool)
    plain = T5Encoder(cfg, nnx.Rngs(0))
    remat = T5Encoder(TextEncoderConfig.tiny(remat=True), nnx.Rngs(0))
    want = np.asarray(plain(ids, mask))
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, i, k: m(i, k))(remat, ids, mask)),
                               want, atol=1e-6, rtol=0)
    grads = nnx.grad(lambda m: jnp.sum(m(ids, mask) ** 2))(remat)
    assert np.all(np.isfinite(np.asarray(grads.layers.attn.q.kernel[...])))
    assert np.abs(np.asarray(grads.layers.attn.rel_bias[...])).sum() > 0


def test_bf16_compute_keeps_fp32_params():
    cfg = TextEncoderConfig.tiny(dtype=jnp.bfloat16)
    model = T5Encoder(cfg, nnx.Rngs(0))
    ids = jnp.asarray(tokens(1, 2, 8))
    out = model(ids, jnp.ones(ids.shape, bool))
    ref = T5Encoder(TextEncoderConfig.tiny(), nnx.Rngs(0))(ids, jnp.ones(ids.shape, bool))
    assert out.dtype == jnp.bfloat16 and model.layers.attn.q.kernel[...].dtype == jnp.float32
    assert np.abs(np.asarray(out, np.float32) - np.asarray(ref)).max() < 0.1


def test_logical_axes_and_hf_name_table_cover_every_param():
    for per_layer in (True, False):
        cfg = TextEncoderConfig.tiny(position_bias_per_layer=per_layer)
        model = T5Encoder(cfg, nnx.Rngs(0))
        flat = nnx.state(model, nnx.Param).flat_state()
        paths = {".".join(map(str, p)) for p, _ in flat}
        assert paths == set(hf_umt5_names(cfg))
    axes = {".".join(map(str, p)): v.get_metadata()["out_sharding"] for p, v in flat}
    assert axes["layers.attn.q.kernel"] == ("layers", "embed", "heads")
    assert axes["layers.ffn.wo.kernel"] == ("layers", "mlp", "embed")
    assert axes["embedding"] == ("vocab", "embed")
    assert axes["rel_bias"] == (None, "heads")


def test_umt5_xxl_shapes_without_allocating():
    cfg = TextEncoderConfig.umt5_xxl()
    shapes = nnx.eval_shape(lambda: T5Encoder(cfg, nnx.Rngs(0)))
    assert shapes.embedding.shape == (256384, 4096)
    assert shapes.layers.attn.q.kernel.shape == (24, 4096, 4096)
    assert shapes.layers.attn.rel_bias.shape == (24, 32, 64)
    assert shapes.layers.ffn.wi_0.kernel.shape == (24, 4096, 10240)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(shapes, nnx.Param)))
    assert 5.6e9 < n < 5.8e9


def test_encode_text_end_to_end():
    cfg = TextEncoderConfig.tiny()
    model = T5Encoder(cfg, nnx.Rngs(0))
    tok = ByteTokenizer()
    emb, mask = encode_text(model, tok, ["a cat", "一只猫在唱歌"], max_length=16)
    assert emb.shape == (2, 16, 32) and mask.shape == (2, 16)
    assert mask[0].sum() == 6 and mask[1].sum() == 16  # 18 UTF-8 bytes + EOS, truncated
    ids, _ = tok.encode(["a cat"], 16)
    direct = model(jnp.asarray(ids), jnp.asarray(mask[:1]))
    np.testing.assert_allclose(np.asarray(emb[:1]), np.asarray(direct), atol=1e-6, rtol=0)


def test_bad_inputs_raise_clear_errors():
    model = T5Encoder(TextEncoderConfig.tiny(), nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"ids must be \[batch, length\]"):
        model(jnp.zeros((4,), jnp.int32), jnp.ones((4,), bool))
    with pytest.raises(ValueError, match="mask shape"):
        model(jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 5), bool))
    with pytest.raises(TypeError, match="integer token ids"):
        model(jnp.zeros((1, 4), jnp.float32), jnp.ones((1, 4), bool))
    with pytest.raises(ValueError, match="num_buckets"):
        TextEncoderConfig.tiny(num_buckets=7)
    with pytest.raises(ValueError, match="d_model"):
        TextEncoderConfig.tiny(d_model=0)
    small = T5Encoder(TextEncoderConfig.tiny(vocab_size=100), nnx.Rngs(0))
    with pytest.raises(ValueError, match="larger than the encoder's embedding"):
        encode_text(small, ByteTokenizer(), ["x"], 8)

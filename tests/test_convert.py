"""The conversion CLI: import once, save as Orbax, load back bit-identical; bad input exits 2."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from avatarv_jax.io import CheckpointMismatchError, load_safetensors
from avatarv_jax.io.convert import (
    METADATA,
    config_from_json,
    config_to_json,
    convert,
    converted_config,
    load_converted,
    main,
)
from avatarv_jax.io.umt5 import import_umt5
from avatarv_jax.models.text_encoder import T5Encoder, TextEncoderConfig
from avatarv_jax.models.vae import VAEConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = TextEncoderConfig(vocab_size=300, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2)
HF_CONFIG = {"architectures": ["UMT5EncoderModel"], "model_type": "umt5", "vocab_size": 300,
             "d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64, "num_layers": 2,
             "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
             "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
             "layer_norm_epsilon": 1e-6}


def _umt5_tensors(seed=0):
    """A random tiny umT5 encoder in transformers' names and layout (no torch needed)."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    t = {"shared.weight": r(300, 32), "encoder.final_layer_norm.weight": r(32)}
    for i in range(2):
        b = f"encoder.block.{i}.layer"
        t.update({f"{b}.0.layer_norm.weight": r(32), f"{b}.1.layer_norm.weight": r(32),
                  f"{b}.0.SelfAttention.relative_attention_bias.weight": r(32, 4),
                  f"{b}.1.DenseReluDense.wi_0.weight": r(64, 32),
                  f"{b}.1.DenseReluDense.wi_1.weight": r(64, 32),
                  f"{b}.1.DenseReluDense.wo.weight": r(32, 64)})
        for p in "qkvo":
            t[f"{b}.0.SelfAttention.{p}.weight"] = r(32, 32)
    return t


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src") / "text_encoder"
    folder.mkdir()
    save_file(_umt5_tensors(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(HF_CONFIG))
    return folder


def _flat(module):
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(module))}


def _assert_bit_identical(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        assert np.array_equal(fa[k].view(np.uint8), fb[k].view(np.uint8)), k


def test_umt5_round_trip_is_bit_identical(umt5_dir, tmp_path):
    dest = tmp_path / "out" / "umt5"
    report = convert("umt5", umt5_dir, dest)
    assert report.tensors == 22
    assert sorted(os.listdir(dest.parent)) == ["umt5"]          # no temporary left behind
    meta = json.loads((dest / METADATA).read_text())
    assert meta["kind"] == "umt5" and meta["parameters"] == report.parameters
    direct, _ = import_umt5(umt5_dir)
    built = load_converted(dest, lambda: T5Encoder(CFG, nnx.Rngs(1)))
    _assert_bit_identical(built, direct)
    # Without a builder, the saved config rebuilds the module.
    assert converted_config(dest) == CFG
    _assert_bit_identical(load_converted(dest), direct)
    ids = jnp.asarray(np.arange(12, dtype=np.int32).reshape(2, 6))
    np.testing.assert_array_equal(np.asarray(built(ids)), np.asarray(direct(ids)))


def test_load_into_a_wrong_module_names_the_differences(umt5_dir, tmp_path):
    dest = tmp_path / "umt5"
    convert("umt5", umt5_dir, dest)
    wrong = TextEncoderConfig(**{**CFG.__dict__, "d_ff": 48})
    with pytest.raises(CheckpointMismatchError, match=r"layers\.ffn\.wo\.kernel"):
        load_converted(dest, lambda: T5Encoder(wrong, nnx.Rngs(0)))


def test_vae_round_trip_is_bit_identical(tmp_path):
    """A random tiny diffusers-layout VAE: list-indexed modules survive the round trip."""
    from avatarv_jax.io.wan_vae import expected_shapes, import_wan_vae

    cfg = VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
                    temporal_downsample=(False, True, True), latents_mean=(0.1,) * 4,
                    latents_std=(2.0,) * 4)
    rng = np.random.default_rng(0)
    src = tmp_path / "vae.safetensors"
    save_file({k: rng.standard_normal(s).astype(np.float32)
               for k, s in expected_shapes(cfg).items()}, str(src))
    with pytest.raises(ValueError, match="no config.json"):          # a bare file needs cfg
        convert("wan_vae", src, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    convert("wan_vae", src, tmp_path / "vae", model_cfg=cfg)
    direct, _ = import_wan_vae(src, cfg)
    restored = load_converted(tmp_path / "vae")
    _assert_bit_identical(restored, direct)
    assert converted_config(tmp_path / "vae") == cfg


def test_config_json_round_trip():
    from avatarv_jax.testing import tiny_dit_config

    for kind, cfg in [("umt5", TextEncoderConfig.tiny(dtype=jnp.bfloat16)),
                      ("wan_vae", VAEConfig.tiny()), ("wan_dit", tiny_dit_config())]:
        saved = json.loads(json.dumps(config_to_json(cfg)))
        assert config_from_json(kind, saved) == cfg


def _leftovers(parent):
    return sorted(os.listdir(parent)) if parent.exists() else []


def test_bad_inputs_exit_2_and_leave_nothing(umt5_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    # Missing source.
    assert main(["--kind", "umt5", "--source", str(tmp_path / "absent"),
                 "--dest", str(out / "a")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    # A checkpoint that does not match: the one error names the key.
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = _umt5_tensors()
    del tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    (bad / "config.json").write_text(json.dumps(HF_CONFIG))
    assert main(["--kind", "umt5", "--source", str(bad), "--dest", str(out / "b")]) == 2
    assert "encoder.block.1.layer.1.DenseReluDense.wo.weight" in capsys.readouterr().err
    # An unsupported feed-forward.
    (bad / "config.json").write_text(json.dumps({**HF_CONFIG, "feed_forward_proj": "relu"}))
    assert main(["--kind", "umt5", "--source", str(bad), "--dest", str(out / "c")]) == 2
    assert "feed_forward_proj='relu'" in capsys.readouterr().err
    # wan_dit needs a model config; a missing config file is named.
    assert main(["--kind", "wan_dit", "--source", str(umt5_dir), "--dest", str(out / "d")]) == 2
    assert "needs --config" in capsys.readouterr().err
    assert main(["--kind", "umt5", "--source", str(umt5_dir), "--dest", str(out / "e"),
                 "--config", str(tmp_path / "nope.py")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert _leftovers(out) == []
    # An existing destination is never overwritten.
    (out / "f").mkdir()
    (out / "f" / "keep").write_text("x")
    assert main(["--kind", "umt5", "--source", str(umt5_dir), "--dest", str(out / "f")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert _leftovers(out) == ["f"] and _leftovers(out / "f") == ["keep"]


def test_config_file_must_agree_with_config_json(umt5_dir, tmp_path, capsys):
    # configs/tiny.py selects TextEncoderConfig.tiny() (vocab 259), not this checkpoint's 300.
    rc = main(["--kind", "umt5", "--source", str(umt5_dir), "--dest", str(tmp_path / "x"),
               "--config", os.path.join(REPO, "configs", "tiny.py")])
    assert rc == 2
    assert "vocab_size: given 259" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_module_cli(umt5_dir, tmp_path):
    """``python -m avatarv_jax.io.convert``: status 0 and a loadable result; 2 on bad input."""
    dest = tmp_path / "cli"
    ok = subprocess.run([sys.executable, "-m", "avatarv_jax.io.convert", "--kind", "umt5",
                         "--source", str(umt5_dir), "--dest", str(dest)],
                        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "saved to" in ok.stdout
    weights = load_safetensors(umt5_dir / "model.safetensors")
    restored = load_converted(dest)
    np.testing.assert_array_equal(np.asarray(restored.embedding[...]), weights["shared.weight"])
    bad = subprocess.run([sys.executable, "-m", "avatarv_jax.io.convert", "--kind", "umt5",
                          "--source", str(tmp_path / "absent"), "--dest", str(tmp_path / "z")],
                         cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 2 and "no checkpoint at" in bad.stderr
    assert not (tmp_path / "z").exists()


def test_wan_dit_with_config_file_round_trip(tmp_path):
    """``--config configs/tiny.py`` sizes the DiT; Wan's tensors and the fresh modules are kept."""
    from avatarv_jax.config import get_model_config
    from avatarv_jax.io.wan_dit import expected_shapes, import_wan_dit
    from avatarv_jax.models.dit import DiTConfig

    cfg = DiTConfig.from_config(get_model_config("tiny").model)
    rng = np.random.default_rng(0)
    src = tmp_path / "wan.safetensors"
    save_file({k: rng.standard_normal(s).astype(np.float32)
               for k, s in expected_shapes(cfg).items()}, str(src))
    assert main(["--kind", "wan_dit", "--source", str(src), "--dest", str(tmp_path / "dit"),
                 "--config", os.path.join(REPO, "configs", "tiny.py")]) == 0
    assert converted_config(tmp_path / "dit") == cfg
    direct, _ = import_wan_dit(src, cfg)
    _assert_bit_identical(load_converted(tmp_path / "dit"), direct)

"""Importing Wan 2.1 VAE weights: name/layout mapping, one-error reports, file layouts, parity."""

import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from avatarv_jax.io import (CheckpointMismatchError, SafetensorsCheckpoint,
                            UnsupportedCheckpointError, check_names_and_shapes, load_safetensors)
from avatarv_jax.io.wan_vae import expected_shapes, import_wan_vae
from avatarv_jax.models.vae import VAEConfig, VAEStreamer

CFG = VAEConfig.tiny()


def _config_json(cfg: VAEConfig, **extra) -> dict:
    return {"_class_name": "AutoencoderKLWan", "base_dim": cfg.base_dim, "z_dim": cfg.z_dim,
            "dim_mult": list(cfg.dim_mult), "num_res_blocks": cfg.num_res_blocks,
            "temperal_downsample": list(cfg.temporal_downsample),
            "latents_mean": list(cfg.latents_mean), "latents_std": list(cfg.latents_std),
            **extra}


def _tensors(cfg: VAEConfig = CFG, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in expected_shapes(cfg).items()}


def _write(folder, tensors, config: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_names_and_layouts_map_one_to_one(tmp_path):
    tensors = _tensors()
    vae, report = import_wan_vae(_write(tmp_path / "vae", tensors, _config_json(CFG)))
    assert report.tensors == len(tensors) == 146
    assert report.parameters == sum(t.size for t in tensors.values())
    assert report.source_dtypes == {"F32": 146}
    np.testing.assert_array_equal(  # Conv3d (O, I, T, H, W) -> (T, H, W, I, O)
        vae.encoder.conv_in.kernel[...],
        tensors["encoder.conv_in.weight"].transpose(2, 3, 4, 1, 0))
    np.testing.assert_array_equal(  # the Conv2d after ZeroPad2d sits at resample.1
        vae.encoder.down_blocks[3].resample.kernel[...],
        tensors["encoder.down_blocks.3.resample.1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        vae.encoder.down_blocks[3].time_conv.kernel[...],
        tensors["encoder.down_blocks.3.time_conv.weight"].transpose(2, 3, 4, 1, 0))
    np.testing.assert_array_equal(
        vae.decoder.up_blocks[0].upsamplers[0].time_conv.bias[...],
        tensors["decoder.up_blocks.0.upsamplers.0.time_conv.bias"])
    np.testing.assert_array_equal(  # 1x1 Conv2d (O, I, 1, 1) -> dense (I, O)
        vae.decoder.mid_block.attentions[0].to_qkv.kernel[...],
        tensors["decoder.mid_block.attentions.0.to_qkv.weight"][:, :, 0, 0].T)
    np.testing.assert_array_equal(
        vae.decoder.mid_block.attentions[0].norm.gamma[...],
        tensors["decoder.mid_block.attentions.0.norm.gamma"].reshape(-1))
    np.testing.assert_array_equal(
        vae.decoder.up_blocks[1].resnets[0].norm1.gamma[...],
        tensors["decoder.up_blocks.1.resnets.0.norm1.gamma"].reshape(-1))
    assert vae.config == CFG


def test_bf16_checkpoint_is_upcast(tmp_path):
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in _tensors().items()}
    vae, report = import_wan_vae(_write(tmp_path, tensors), CFG)
    assert report.source_dtypes == {"BF16": 146}
    assert vae.quant_conv.kernel[...].dtype == jnp.float32
    np.testing.assert_array_equal(vae.quant_conv.bias[...],
                                  tensors["quant_conv.bias"].astype(np.float32))


@pytest.mark.parametrize("problem, message", [
    ("missing", r"\(1 problem\):\n  missing keys \(1\):\n    decoder\.conv_out\.bias  "
                r"expected shape \(3,\)"),
    ("extra", r"unexpected keys \(1\):\n    encoder\.extra\.weight  shape \(2, 2\)"),
    ("shape", r"shape mismatches \(1\):\n    encoder\.conv_in\.weight  expected "
              r"\(8, 3, 3, 3, 3\), found \(8, 3, 1, 3, 3\)"),
])
def test_each_mismatch_gets_its_message(tmp_path, problem, message):
    tensors = _tensors()
    if problem == "missing":
        del tensors["decoder.conv_out.bias"]
    elif problem == "extra":
        tensors["encoder.extra.weight"] = np.zeros((2, 2), np.float32)
    else:
        tensors["encoder.conv_in.weight"] = np.zeros((8, 3, 1, 3, 3), np.float32)
    with pytest.raises(CheckpointMismatchError, match=message):
        import_wan_vae(_write(tmp_path, tensors), CFG)


def test_all_problems_in_one_error(tmp_path):
    tensors = _tensors()
    del tensors["post_quant_conv.weight"]
    del tensors["encoder.norm_out.gamma"]
    tensors["decoder.bogus"] = np.zeros(3, np.float32)
    tensors["quant_conv.bias"] = np.zeros(5, np.float32)
    with pytest.raises(CheckpointMismatchError) as info:
        import_wan_vae(_write(tmp_path, tensors), CFG)
    err = info.value
    assert "(4 problems)" in str(err)
    assert set(err.missing) == {"post_quant_conv.weight", "encoder.norm_out.gamma"}
    assert set(err.unexpected) == {"decoder.bogus"}
    assert err.mismatched == {"quant_conv.bias": ((32,), (5,))}


def test_wrong_config_lists_every_shape_problem(tmp_path):
    folder = _write(tmp_path, _tensors())
    with pytest.raises(CheckpointMismatchError, match="shape mismatches") as info:
        import_wan_vae(folder, VAEConfig.tiny(base_dim=4))
    assert len(info.value.mismatched) > 50


def test_original_wan_layout_gets_a_conversion_hint(tmp_path):
    tensors = {"encoder.downsamples.0.residual.0.gamma": np.ones((96, 1, 1, 1), np.float32)}
    with pytest.raises(CheckpointMismatchError, match="original Wan layout.*from_single_file"):
        import_wan_vae(_write(tmp_path, tensors), CFG)


def test_pickle_checkpoints_are_refused(tmp_path):
    pth = tmp_path / "Wan2.1_VAE.pth"
    pth.write_bytes(b"not read")
    for target in (pth, tmp_path):
        with pytest.raises(UnsupportedCheckpointError,
                           match="(?s)pickle-based.*can run arbitrary code.*"
                                 "Wan2.1_VAE.pth is a pickle.*Diffusers"):
            import_wan_vae(target, CFG)


def test_config_json_must_agree_with_cfg(tmp_path):
    folder = _write(tmp_path, _tensors(), _config_json(CFG))
    with pytest.raises(ValueError, match="disagrees.*\n  num_res_blocks: given 2, .* has 1"):
        import_wan_vae(folder, VAEConfig.tiny(num_res_blocks=2))
    (folder / "config.json").write_text(json.dumps(_config_json(CFG, is_residual=True,
                                                                patch_size=2)))
    with pytest.raises(ValueError, match="is_residual=True.*not supported; patch_size=2"):
        import_wan_vae(folder)


def test_needs_a_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json.*pass cfg"):
        import_wan_vae(_write(tmp_path, _tensors()))


def test_pipeline_root_and_sharded_index(tmp_path):
    tensors = _tensors(seed=1)
    vae_dir = tmp_path / "pipe" / "vae"
    vae_dir.mkdir(parents=True)
    (vae_dir / "config.json").write_text(json.dumps(_config_json(CFG)))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"shard-1.safetensors": names[:half], "shard-2.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(vae_dir / shard))
    index = {"weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (vae_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "pipe" / "model_index.json").write_text("{}")

    vae, report = import_wan_vae(tmp_path / "pipe")
    assert report.tensors == len(tensors)
    np.testing.assert_array_equal(vae.decoder.conv_out.kernel[...],
                                  tensors["decoder.conv_out.weight"].transpose(2, 3, 4, 1, 0))

    (vae_dir / "shard-2.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lists shards that do not exist.*shard-2"):
        import_wan_vae(tmp_path / "pipe")


def test_safetensors_io_generic(tmp_path):
    a = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_file(a, str(tmp_path / "one.safetensors"))
    ckpt = SafetensorsCheckpoint(tmp_path)
    assert ckpt.keys() == ["x"] and ckpt.shapes() == {"x": (2, 3)} and ckpt.dtype("x") == "F32"
    np.testing.assert_array_equal(load_safetensors(tmp_path / "one.safetensors")["x"], a["x"])
    with pytest.raises(KeyError, match="no tensor 'y'"):
        ckpt.get("y")
    save_file(a, str(tmp_path / "two.safetensors"))
    with pytest.raises(UnsupportedCheckpointError, match="several safetensors files "
                                                         "\\(one.safetensors, two.safetensors\\)"):
        SafetensorsCheckpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsupportedCheckpointError, match="no \\*.safetensors"):
        SafetensorsCheckpoint(tmp_path / "empty")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(UnsupportedCheckpointError, match="not a .safetensors file"):
        SafetensorsCheckpoint(tmp_path / "w.npz")
    with pytest.raises(FileNotFoundError):
        SafetensorsCheckpoint(tmp_path / "nothing")


def test_check_names_and_shapes_passes_when_equal():
    check_names_and_shapes({"a": (1,)}, {"a": (1,), "b": (2,)}, source="s", ignore=["b"])
    with pytest.raises(CheckpointMismatchError, match="checkpoint s does not match"):
        check_names_and_shapes({"a": (1,)}, {"a": (1,), "b": (2,)}, source="s")


# ---- parity with diffusers (pip install -e .[parity]) ------------------------------------------

def test_wan21_table_matches_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLWan()  # the Wan 2.1 defaults, no memory allocated
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == expected_shapes(
        VAEConfig.wan21())


def test_parity_with_diffusers(tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    mean, std = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
    ref = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2],
                                     num_res_blocks=1, temperal_downsample=[False, True, True],
                                     latents_mean=mean, latents_std=std).eval()
    with torch.no_grad():  # move norm scales and biases off their trivial init
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    ref.save_pretrained(tmp_path, safe_serialization=True)
    vae, _ = import_wan_vae(tmp_path)
    streamer = VAEStreamer(vae)

    video = torch.rand(1, 3, 13, 32, 16) * 2 - 1  # non-square catches H/W swaps
    with torch.no_grad():
        mu = ref.encode(video).latent_dist.mean
        out = ref.decode(mu).sample
    m = torch.tensor(mean).view(1, 4, 1, 1, 1)
    s = torch.tensor(std).view(1, 4, 1, 1, 1)
    want_z = ((mu - m) / s).permute(0, 2, 3, 4, 1).numpy()
    want_x = out.permute(0, 2, 3, 4, 1).numpy()
    assert (np.abs(want_x) < 1).mean() > 0.5  # not a comparison of clamped values

    z = streamer.encode(jnp.asarray(video.permute(0, 2, 3, 4, 1).numpy()))
    assert z.shape == (1, 4, 4, 2, 4)
    assert np.abs(np.asarray(z) - want_z).max() <= 1e-4
    x = streamer.decode(jnp.asarray(want_z))
    assert x.shape == (1, 13, 32, 16, 3)
    assert np.abs(np.asarray(x) - want_x).max() <= 1e-4

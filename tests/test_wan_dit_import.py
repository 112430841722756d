"""Importing Wan 2.1 T2V transformer weights: parity with diffusers, one-error reports."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from avatarv_jax.io import CheckpointMismatchError, load_safetensors
from avatarv_jax.io.wan_dit import expected_shapes, import_wan_dit
from avatarv_jax.models.dit import DiTConfig, GenInputs

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

HEADS, HEAD_DIM, LAYERS = 2, 24, 2
WAN_KW = {"patch_size": (1, 2, 2), "num_attention_heads": HEADS, "attention_head_dim": HEAD_DIM,
          "in_channels": 16, "out_channels": 16, "text_dim": 32, "freq_dim": 32, "ffn_dim": 64,
          "num_layers": LAYERS, "rope_max_seq_len": 1024}
CFG = DiTConfig(dim=HEADS * HEAD_DIM, num_heads=HEADS, num_layers=LAYERS, ffn_dim=64,
                in_channels=16, out_channels=16, text_dim=32, freq_dim=32, audio_dim=0,
                motion_dim=0, dtype="float32")


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """A random tiny diffusers Wan transformer saved as safetensors: (model, folder)."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**WAN_KW).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm2.weight")):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("wan") / "transformer"
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.fixture(scope="module")
def imported(wan):
    return import_wan_dit(wan[1], CFG)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal((1, 3, 4, 6, 16)).astype(np.float32)   # [B, F, H, W, C]
    text = rng.standard_normal((1, 5, 32)).astype(np.float32)
    return latents, text


def _diffusers(model, latents, timestep, text):
    with torch.no_grad():
        out = model(torch.from_numpy(latents.transpose(0, 4, 1, 2, 3).copy()),
                    torch.as_tensor(timestep, dtype=torch.float32),
                    torch.from_numpy(text), return_dict=False)[0]
    return out.numpy().transpose(0, 2, 3, 4, 1)                          # -> [B, F, H, W, C]


def test_tables_match_diffusers(wan):
    model, folder = wan
    ours = expected_shapes(CFG)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == theirs
    assert set(load_safetensors(folder)) == set(theirs)


def test_report_and_fresh_modules(wan, imported):
    model, _ = wan
    dit, report = imported
    assert report.tensors == len(model.state_dict())
    assert report.parameters == sum(p.numel() for p in model.parameters())
    assert report.source_dtypes == {"F32": report.tensors}
    assert any("ref_embedding" in n for n in report.notes)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(dit.blocks.attn1.to_q.kernel[...][1],
                                  sd["blocks.1.attn1.to_q.weight"].T)
    np.testing.assert_array_equal(dit.blocks.attn2.to_out.kernel[...][0],
                                  sd["blocks.0.attn2.to_out.0.weight"].T)
    np.testing.assert_array_equal(dit.blocks.scale_shift_table[...][1],
                                  sd["blocks.1.scale_shift_table"][0])
    np.testing.assert_array_equal(dit.blocks.norm2.scale[...][0], sd["blocks.0.norm2.weight"])
    np.testing.assert_array_equal(dit.blocks.ffn_out.kernel[...][1],
                                  sd["blocks.1.ffn.net.2.weight"].T)


def test_fresh_modules_with_audio_and_motion(wan):
    cfg = DiTConfig(**{**CFG.__dict__, "audio_dim": 8, "motion_dim": 3})
    dit, report = import_wan_dit(wan[1], cfg)
    note = " ".join(report.notes)
    for name in ("ref_embedding", "audio_proj", "audio_pos", "blocks.attn_audio.to_q.kernel",
                 "blocks.norm_audio.scale", "motion_encoder", "motion_head"):
        assert name in note
    assert "blocks.attn1" not in note
    # Fresh init, not zeros / garbage: the audio output projection starts at zero, q does not.
    assert float(jnp.abs(dit.blocks.attn_audio.to_q.kernel[...]).max()) > 0
    assert float(jnp.abs(dit.blocks.attn_audio.to_out.kernel[...]).max()) == 0


def test_forward_matches_diffusers(wan, imported):
    model, _ = wan
    dit, _ = imported
    latents, text = _inputs()
    for t in (0.0, 437.0, 999.0):
        ref = _diffusers(model, latents, [t], text)
        ours = dit(GenInputs(latents=jnp.asarray(latents),
                             timesteps=jnp.full((1, 3), t, jnp.float32),
                             text=jnp.asarray(text)))["video"]
        diff = float(np.abs(np.asarray(ours) - ref).max())
        print(f"t={t}: max |ours - diffusers| = {diff:.3e} (output scale "
              f"{float(np.abs(ref).max()):.2f})")
        assert diff <= 1e-4


def test_per_frame_timesteps_match_per_token_diffusers(wan, imported):
    """diffusers accepts a timestep per token ([B, seq_len]); ours is one per latent frame."""
    model, _ = wan
    dit, _ = imported
    latents, text = _inputs(1)
    frame_t = np.array([[0.0, 250.0, 900.0]], np.float32)
    tokens_per_frame = (4 // 2) * (6 // 2)
    ref = _diffusers(model, latents, np.repeat(frame_t, tokens_per_frame, axis=1), text)
    ours = dit(GenInputs(latents=jnp.asarray(latents), timesteps=jnp.asarray(frame_t),
                         text=jnp.asarray(text)))["video"]
    diff = float(np.abs(np.asarray(ours) - ref).max())
    print(f"per-frame timesteps: max |ours - diffusers| = {diff:.3e}")
    assert diff <= 1e-4


def _rewrite(src, dst, change):
    tensors = load_safetensors(src)
    change(tensors)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "diffusion_pytorch_model.safetensors"))
    return dst


def test_one_error_lists_every_offending_key(wan, tmp_path):
    def change(t):
        del t["blocks.1.attn2.norm_k.weight"]
        t["blocks.0.attn2.add_k_proj.weight"] = np.zeros((48, 48), np.float32)
        t["proj_out.weight"] = np.zeros((60, 48), np.float32)
        t["blocks.0.scale_shift_table"] = np.zeros((6, 48), np.float32)

    folder = _rewrite(wan[1], tmp_path / "bad", change)
    with pytest.raises(CheckpointMismatchError) as err:
        import_wan_dit(folder, CFG)
    e, msg = err.value, str(err.value)
    assert set(e.missing) == {"blocks.1.attn2.norm_k.weight"}
    assert set(e.unexpected) == {"blocks.0.attn2.add_k_proj.weight"}
    assert e.mismatched == {"proj_out.weight": ((64, 48), (60, 48)),
                            "blocks.0.scale_shift_table": ((1, 6, 48), (6, 48))}
    assert "4 problems" in msg
    for key in ("blocks.1.attn2.norm_k.weight", "blocks.0.attn2.add_k_proj.weight",
                "proj_out.weight", "blocks.0.scale_shift_table"):
        assert key in msg


def test_single_file_and_config_checks(wan, tmp_path):
    model, folder = wan
    _dit, report = import_wan_dit(folder / "diffusion_pytorch_model.safetensors", CFG)
    assert report.tensors == len(model.state_dict())
    wrong = DiTConfig(**{**CFG.__dict__, "ffn_dim": 96})
    with pytest.raises(ValueError, match="ffn_dim: given 96"):
        import_wan_dit(folder, wrong)
    cfg_i2v = json.loads((folder / "config.json").read_text())
    cfg_i2v["image_dim"] = 1280
    bad = tmp_path / "i2v"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg_i2v))
    (bad / "diffusion_pytorch_model.safetensors").symlink_to(
        folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError, match="I2V"):
        import_wan_dit(bad, CFG)


def test_sharded_bf16_checkpoint(wan, tmp_path):
    """A sharded index of bf16 tensors imports, upcast to fp32, equal to the bf16 values."""
    import ml_dtypes
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_safetensors(wan[1]).items()}
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / shard))
    index = {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    dit, report = import_wan_dit(tmp_path, CFG)
    assert report.source_dtypes == {"BF16": len(names)}
    assert dit.blocks.attn1.to_k.kernel[...].dtype == jnp.float32
    np.testing.assert_array_equal(
        dit.blocks.attn1.to_k.kernel[...][1],
        tensors["blocks.1.attn1.to_k.weight"].astype(np.float32).T)
    np.testing.assert_array_equal(  # Conv3d [D, C, 1, ph, pw] -> Dense [(ph, pw, C), D]
        dit.patch_embedding.kernel[...],
        tensors["patch_embedding.weight"].astype(np.float32)[:, :, 0]
        .transpose(2, 3, 1, 0).reshape(-1, 48))

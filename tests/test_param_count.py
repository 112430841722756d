"""Parameter counts from nnx.eval_shape, and the Wan-compatible part against diffusers."""

import pytest

from avatarv_jax.config import get_model_config
from avatarv_jax.tools.param_count import count_all, format_report

WAN_DIMS = {"avatar_v_1_3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960,
                                  num_layers=30),
            "avatar_v_14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824,
                                 num_layers=40)}


@pytest.mark.parametrize("name", ["avatar_v_1_3b", "avatar_v_14b"])
def test_counts_without_allocating(name):
    report = count_all(get_model_config(name))
    dit = report["dit"]
    # Width-only arithmetic for one block of the Wan layout: two attentions (4 projections
    # with biases + 2 RMS-norm scales), the affine norm2, FFN, and the 6-row modulation table.
    cfg = get_model_config(name).model
    d, f = cfg.dim, cfg.ffn_dim
    block = 2 * (4 * (d * d + d) + 2 * d) + 2 * d + (2 * d * f + f + d) + 6 * d
    assert dit["wan_compatible"] > cfg.num_layers * block
    assert set(dit) == {"wan_compatible", "audio cross-attention", "motion stream",
                        "REF handling"}
    assert "Wan 2.1-compatible part" in format_report(report)
    if name == "avatar_v_14b":
        assert abs(report["wan_relative_difference"]) < 0.03


def test_sr_variant_adds_only_the_condition_embedding():
    base = count_all(get_model_config("avatar_v_1_3b"))
    sr = count_all(get_model_config("avatar_v_1_3b", "sr"))
    assert sr["dit"]["wan_compatible"] == base["dit"]["wan_compatible"]
    assert sr["dit"]["SR condition"] == 2 * 2 * 16 * 1536


@pytest.mark.parametrize("name", ["avatar_v_1_3b", "avatar_v_14b"])
def test_wan_compatible_part_equals_diffusers(name):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        wan = diffusers.WanTransformer3DModel(**WAN_DIMS[name])
    expected = sum(p.numel() for p in wan.parameters())
    assert count_all(get_model_config(name))["dit"]["wan_compatible"] == expected


def test_module_table_sums_to_the_dit_total():
    report = count_all(get_model_config("tiny"))
    assert sum(report["dit_modules"].values()) == report["dit_total"]
    assert {"blocks.attn1", "blocks.attn2", "blocks.attn_audio", "blocks.scale_shift_table",
            "patch_embedding", "motion_encoder"} <= set(report["dit_modules"])

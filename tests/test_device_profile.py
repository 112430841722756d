"""The step profiler's summary (kernel kinds, sums, shares) and the phase attribution script."""

import json

import jax
import jax.numpy as jnp
import pytest

from avatarv_jax.testing import load_benchmark
from avatarv_jax.tools import device_profile


def test_kernel_kinds_from_names():
    kind = device_profile.kernel_kind
    assert kind("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma") == "attention"
    assert kind("sra_dkv_gen") == "attention"
    assert kind("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert kind("void cutlass::Kernel2<cutlass_75_tensorop_bf16_s1688gemm>") == "matmul"
    assert kind("input_transpose_fusion_4") == "copy"
    assert kind("loop_convert_fusion_26") == "other"


def test_summary_sums_per_name_and_kind():
    events = [("sra_forward_gen", 2.0), ("gemm_fusion_dot_1", 1.0), ("sra_forward_gen", 1.0),
              ("loop_add_fusion", 0.5), ("MemcpyD2D", 0.5)]
    s = device_profile.summarize(events, top=2)
    assert s["device_seconds"] == pytest.approx(5.0)
    assert s["kinds"]["attention"] == {"seconds": 3.0, "fraction": 0.6}
    assert s["kinds"]["copy"]["seconds"] == 0.5
    assert [k["name"] for k in s["top_kernels"]] == ["sra_forward_gen", "gemm_fusion_dot_1"]
    assert s["top_kernels"][0]["calls"] == 2
    assert "attention" in device_profile.format_summary(s)


def test_profile_call_sees_the_work_it_ran():
    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((256, 256))
    f(x).block_until_ready()
    s = device_profile.profile_call(lambda: f(x).block_until_ready())
    assert s["device_seconds"] > 0 and s["top_kernels"]


def test_phase_attribution_from_hlo_metadata(tmp_path, monkeypatch, capsys):
    mod = load_benchmark("attribute_profile")
    hlo = "\n".join([
        '  %fusion.1 = f32[4]{0} fusion(%p), metadata={op_name="jit(step)/jvp()/while/body/mul"}',
        '  %fusion.2 = f32[4]{0} fusion(%p), metadata={op_name="jit(step)/transpose(jvp())/'
        'while/body/checkpoint/rematted_computation/mul"}',
        '  %custom-call.3 = f32[4]{0} custom-call(%p), metadata={op_name="jit(step)/'
        'transpose(jvp())/while/body/dot_general"}',
        '  %fusion.4 = f32[4]{0} fusion(%p), metadata={op_name="jit(step)/vmap()/add"}',
    ])
    profile = device_profile.summarize(
        [("loop_mul_fusion", 1.0, _Event("fusion.1")), ("loop_mul_fusion_2", 0.5,
         _Event("fusion.2")), ("nvjet_gemm", 2.0, _Event("custom-call.3")),
         ("loop_add_fusion", 0.25, _Event("fusion.4")), ("MemcpyD2D", 0.25, _Event("copy.9"))])
    out = mod.attribute(profile, hlo)
    assert out["phases"]["forward"] == {"other": 1.0, "total": 1.0}
    assert out["phases"]["recompute"]["other"] == 0.5
    assert out["phases"]["backward"]["matmul"] == 2.0
    assert out["phases"]["optimizer"]["other"] == 0.25
    assert out["phases"]["unknown"]["copy"] == 0.25
    # The CLI: a result without a profile is refused by name; a good one writes _phases.json.
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"step_s": 1.0}))
    (tmp_path / "h.txt").write_text(hlo)
    monkeypatch.setattr("sys.argv", ["attribute_profile.py", str(bad), str(tmp_path / "h.txt")])
    with pytest.raises(SystemExit, match="has no profile"):
        mod.main()
    bad.write_text(json.dumps({"step_s": 1.0, "profile": profile}))
    mod.main()
    written = json.loads((tmp_path / "r_phases.json").read_text())
    assert written["phases"]["backward"]["total"] == 2.0


class _Event:
    """Just enough of a profiler event: stats naming the HLO op."""

    def __init__(self, hlo_op):
        self.stats = [("hlo_op", hlo_op), ("_internal", 1)]

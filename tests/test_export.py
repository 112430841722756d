"""``training/export.py``: the inference-only copy of a trainer checkpoint (how the demo is made).

A trainer work directory (the tiny SFT checkpoint of tests/data, given the optimizer and
data-iterator items a training run leaves beside the weights) is exported; the copy holds only
the inference items, restores into fresh models exactly as the work directory does, carries the
``--set`` overrides into its config, and bad requests fail without leaving a directory.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from avatarv_jax.inference import weights
from avatarv_jax.inference.pipeline import resolve_config
from avatarv_jax.training import export

SFT_TINY = Path(__file__).resolve().parent / "data" / "sft_tiny"
STEP = "1000"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(SFT_TINY, out)
    step = out / "checkpoints" / STEP
    for item in ("opt_state", "data"):            # what a training run saves besides
        (step / item).mkdir()
        (step / item / "state").write_text("training-only")
    meta = json.loads((step / export.STEP_METADATA).read_text())
    meta["item_handlers"].update(opt_state="StandardCheckpointHandler", data="JsonHandler")
    (step / export.STEP_METADATA).write_text(json.dumps(meta))
    return out


def _loaded(checkpoint):
    cfg = resolve_config(None, checkpoint)
    models = weights.random_models(cfg, seed=5)
    info = weights.load_weights(models, checkpoint, log=lambda m: None)
    flat = {name: {"/".join(map(str, p)): np.asarray(v.value)
                   for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
            for name, m in models.items()}
    return cfg, info, flat


def test_export_keeps_inference_items_and_restores_the_same(workdir, tmp_path):
    step = workdir / "checkpoints" / STEP
    assert {"opt_state", "data"} <= {p.name for p in step.iterdir()}      # what is dropped
    out = export.export_inference(workdir, tmp_path / "demo",
                                  overrides=["sampling.text_scale=1", "sampling.method=heun"])
    copied = out / "checkpoints" / STEP
    assert {p.name for p in copied.iterdir() if p.is_dir()} == {"params", "ema", "frozen",
                                                                 "train"}
    handlers = json.loads((copied / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
    assert set(handlers) == {"params", "ema", "frozen", "train"}

    cfg_a, info_a, a = _loaded(str(workdir))
    cfg_b, info_b, b = _loaded(str(out))
    assert info_b.kind == "trainer" and info_b.step == info_a.step == int(STEP)
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            np.testing.assert_array_equal(a[name][k], b[name][k], err_msg=f"{name}/{k}")
    assert cfg_b.sampling.text_scale == 1.0 and cfg_b.sampling.method == "heun"
    assert isinstance(cfg_b.sampling.text_scale, float)
    assert cfg_a.sampling.text_scale != 1
    cfg_b.sampling.text_scale, cfg_b.sampling.method = cfg_a.sampling.text_scale, "euler"
    assert cfg_a.sampling.method == "euler"
    assert json.dumps(cfg_a.to_dict(), sort_keys=True, default=str) == \
        json.dumps(cfg_b.to_dict(), sort_keys=True, default=str)            # nothing else


def test_bad_exports_fail_and_leave_nothing(workdir, tmp_path):
    with pytest.raises(ValueError, match="no 'sampling.nope'"):
        export.export_inference(workdir, tmp_path / "a", overrides=["sampling.nope=1"])
    with pytest.raises(ValueError, match="holds a float"):
        export.export_inference(workdir, tmp_path / "a", overrides=["sampling.text_scale=x"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        export.export_inference(workdir, tmp_path / "a", overrides=["sampling.text_scale"])
    with pytest.raises(ValueError, match="no checkpoint at step 7"):
        export.export_inference(workdir, tmp_path / "a", step=7)
    with pytest.raises(ValueError, match="not a trainer work directory"):
        export.export_inference(tmp_path, tmp_path / "a")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        export.export_inference(workdir, tmp_path / "taken")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_cli_exits_2_on_bad_input(workdir, tmp_path, capsys):
    assert export.main([str(workdir), str(tmp_path / "x"), "--set", "nope=1"]) == 2
    assert "error: --set nope=1" in capsys.readouterr().err
    assert export.main([str(workdir), str(tmp_path / "ok")]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "ok" / "config.json").is_file()

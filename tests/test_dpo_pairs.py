"""DPO on human preference pairs: the JSONL manifest -> Grain batches (decoded from mp4 with
PyAV), their errors, and the DPO step on them (starts at log 2, widens the margin)."""

import json
import math

import jax
import numpy as np
import pytest
import soundfile as sf

from avatarv_jax.data.avatarworld.media import write_mp4
from avatarv_jax.posttrain.dpo import PreferenceManifestError
from avatarv_jax.posttrain.preference_data import (
    PreferenceDataError,
    preference_dataset,
)

SIZE, FRAMES, REF_FRAMES = 32, 5, 5


def _clip(seed: int, frames: int, shift: int = 0) -> np.ndarray:
    """A smooth coloured pattern drifting one pixel a frame (survives H.264 well)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    rng = np.random.default_rng(seed)
    f = rng.uniform(0.06, 0.15, 3)
    out = []
    for t in range(frames):
        img = [127 + 100 * np.sin(f[c] * (xx + t + shift) + c) * np.cos(f[c] * yy)
               for c in range(3)]
        out.append(np.stack(img, -1))
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


def _write_pair_files(root, name: str, seed: int, frames: int = 9):
    audio = (0.1 * np.sin(np.arange(frames * 640) * 0.05 * (seed + 1))).astype(np.float32)
    write_mp4(str(root / f"{name}_ref.mp4"), _clip(seed + 100, frames), audio)
    sf.write(root / f"{name}.wav", audio, 16000)
    preferred, rejected = _clip(seed, frames), _clip(seed + 50, frames, shift=15)
    write_mp4(str(root / f"{name}_good.mp4"), preferred)
    write_mp4(str(root / f"{name}_bad.mp4"), rejected)
    return {"reference": f"{name}_ref.mp4", "audio": f"{name}.wav",
            "preferred": f"{name}_good.mp4", "rejected": f"{name}_bad.mp4",
            "caption": f"person {name} talking"}, preferred, rejected, audio


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    clips = root / "clips"
    clips.mkdir()
    entries, truth = [], {}
    for i, name in enumerate(("a", "b")):
        entry, good, bad, audio = _write_pair_files(clips, name, i)
        entries.append({k: (f"clips/{v}" if k not in ("caption",) else v)
                        for k, v in entry.items()})
        truth[name] = (good, bad, audio)
    path = root / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in entries) + "\n\n")
    return path, truth


def _dataset(path, **kw):
    args = dict(batch_size=2, frames=FRAMES, ref_frames=REF_FRAMES, resolution=SIZE,
                text_length=16, motion_dim=10, seed=0, shuffle=False)
    args.update(kw)
    return preference_dataset(str(path), **args)


def test_batches_decode_the_labelled_videos(manifest):
    path, truth = manifest
    batch = next(iter(_dataset(path)))
    assert batch["video"].shape == batch["rejected_video"].shape == (2, FRAMES, SIZE, SIZE, 3)
    assert batch["video"].dtype == np.uint8
    assert batch["ref_video"].shape == (2, REF_FRAMES, SIZE, SIZE, 3)
    assert batch["audio"].shape == (2, FRAMES * 640)
    assert batch["ref_audio"].shape == (2, REF_FRAMES * 640)
    assert batch["motion"].shape == batch["rejected_motion"].shape == (2, FRAMES, 10)
    assert batch["ref_motion"].shape == (2, REF_FRAMES, 10)
    assert batch["text_ids"].shape == (2, 16) and batch["text_mask"].dtype == bool
    np.testing.assert_array_equal(batch["identity_id"], [-1, -1])
    for row, name in enumerate(("a", "b")):          # unshuffled: manifest order
        good, bad, audio = truth[name]
        err_good = np.abs(batch["video"][row].astype(float) - good[:FRAMES]).mean()
        err_bad = np.abs(batch["rejected_video"][row].astype(float) - bad[:FRAMES]).mean()
        assert err_good < 4.0 and err_bad < 4.0, (err_good, err_bad)     # H.264 at crf 18
        # ... and the two sides are not swapped or shared.
        assert np.abs(batch["video"][row].astype(float) - bad[:FRAMES]).mean() > 20
        np.testing.assert_allclose(batch["audio"][row], audio[:FRAMES * 640], atol=1e-4)
        assert np.abs(batch["ref_audio"][row]).max() > 0.02      # the reference's own sound
    # The captions differ only in the name: so do their tokens.
    assert not np.array_equal(batch["text_ids"][0], batch["text_ids"][1])


def test_batch_passes_the_sft_contract(manifest):
    from avatarv_jax.training.batch import check_batch
    check_batch(next(iter(_dataset(manifest[0]))), "sft")


def _write_manifest(tmp_path, lines):
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_manifests_are_named(tmp_path, manifest):
    src, _ = manifest
    good = json.loads(src.read_text().splitlines()[0])
    good = {k: (str(src.parent / v) if k != "caption" else v) for k, v in good.items()}
    with pytest.raises(PreferenceManifestError, match=r"line 2: not valid JSON"):
        _dataset(_write_manifest(tmp_path, [json.dumps(good), "{oops"]), batch_size=1)
    missing = dict(good, rejected=str(tmp_path / "nope.mp4"))
    with pytest.raises(PreferenceManifestError, match=r"line 1: 'rejected' file not found"):
        _dataset(_write_manifest(tmp_path, [json.dumps(missing)]), batch_size=1)
    with pytest.raises(PreferenceManifestError, match="cannot fill a batch of 2"):
        _dataset(_write_manifest(tmp_path, [json.dumps(good)]), batch_size=2)

    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"this is not a video")
    bad = _write_manifest(tmp_path, [json.dumps(dict(good, preferred=str(junk)))])
    with pytest.raises(PreferenceDataError, match=r"preferred video .*junk\.mp4"):
        next(iter(_dataset(bad, batch_size=1)))

    short = tmp_path / "short.mp4"
    write_mp4(str(short), _clip(3, 3))
    bad = _write_manifest(tmp_path, [json.dumps(dict(good, rejected=str(short)))])
    with pytest.raises(PreferenceDataError, match=r"rejected video .*short\.mp4 has 3 frames"):
        next(iter(_dataset(bad, batch_size=1)))

    quiet = tmp_path / "short.wav"
    sf.write(quiet, np.zeros(1000, np.float32), 16000)
    bad = _write_manifest(tmp_path, [json.dumps(dict(good, audio=str(quiet)))])
    with pytest.raises(PreferenceDataError, match=r"driving audio .*short\.wav lasts"):
        next(iter(_dataset(bad, batch_size=1)))


def _dpo_setup(manifest_path):
    """The dpo builder of the tiny config on the manifest, with policy = reference (a perturbed
    tiny DiT, so every path acts), as the trainer builds it."""
    from avatarv_jax.testing import posttrain_setup
    from avatarv_jax.training.stage_config import stage_config

    cfg = stage_config("dpo", "tiny")
    cfg.dpo.pairs = str(manifest_path)
    cfg.optimizer.warmup_steps = 1
    cfg.optimizer.ema_decay = 0.0
    cfg.data.frames, cfg.data.ref_frames, cfg.data.resolution = FRAMES, REF_FRAMES, SIZE
    builder, state, frozen = posttrain_setup(cfg, 100)
    return cfg, builder, state, frozen


def test_dpo_steps_on_human_pairs_widen_the_margin(manifest):
    from avatarv_jax.posttrain.preference_data import make_preference_pipeline

    cfg, builder, state, frozen = _dpo_setup(manifest[0])
    host = next(iter(make_preference_pipeline(cfg)))
    batch = builder.put_batch(host)
    # One compilation: train on fresh noise per step, probe the margin on one held-out draw.
    step = jax.jit(lambda s, k: builder.train_step(s, frozen, batch, k))
    probe = lambda s: jax.device_get(step(s, jax.random.key(123))[1])

    start = probe(state)
    # policy == reference (the two differ only by float rounding between the two paths)
    assert abs(float(start["margin"])) < 1e-4
    assert math.isclose(float(start["loss"]), math.log(2), abs_tol=1e-5)
    # The two sides are different videos: the reference's errors on them differ.
    assert float(start["ref_error_preferred"]) != float(start["ref_error_rejected"])
    for i in range(6):
        state, metrics = step(state, jax.random.key(i))
        assert float(metrics["finite"]) == 1.0
    end = jax.device_get(probe(state))
    assert float(end["margin"]) > 0.05, end
    assert float(end["loss"]) < math.log(2) - 0.02, end
    assert float(end["accuracy"]) == 1.0


# -- through train(): the manifest routes the data, and the stage resumes exactly -------------

RESUME_STEPS = 3
CHILD = """
import sys
sys.path.insert(0, {root!r})
from avatarv_jax.posttrain.preference_data import make_preference_pipeline
from avatarv_jax.testing import sigterm_at
from avatarv_jax.training.trainer import train
from tests.test_dpo_pairs import resume_config, write_start_checkpoint

out, manifest = sys.argv[1:3]
cfg = lambda: resume_config(manifest, out + "/start")
write_start_checkpoint(cfg(), out + "/start")
a = train(cfg(), out + "/a")                      # data: the trainer's own (the manifest)
b = train(cfg(), out + "/b", data=sigterm_at(make_preference_pipeline(cfg()), 1))
r = train(cfg(), out + "/b", data=sigterm_at(make_preference_pipeline(cfg()), None))
print("RESULT", a["step"], a["stopped"], b["step"], b["stopped"], r["step"], r["stopped"],
      flush=True)
"""


def resume_config(manifest_path, init_from):
    from avatarv_jax.testing import quick_stage_config

    cfg = quick_stage_config("dpo", RESUME_STEPS, init_from)
    cfg.dpo.pairs = str(manifest_path)
    cfg.data.frames, cfg.data.ref_frames, cfg.data.resolution = FRAMES, REF_FRAMES, SIZE
    return cfg


def write_start_checkpoint(cfg, workdir):
    """A previous-stage checkpoint (guidance-embedded tiny DiT, perturbed, + frozen models)."""
    import orbax.checkpoint as ocp

    from avatarv_jax.models import factory
    from avatarv_jax.testing import perturb_zero_init
    from avatarv_jax.training.checkpoints import CHECKPOINT_DIR, FROZEN_MODELS
    from avatarv_jax.training.step import module_params

    models = factory.build_models(cfg, seed=3)
    step_dir = (__import__("pathlib").Path(workdir) / CHECKPOINT_DIR / "0").absolute()
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(step_dir / "params", module_params(perturb_zero_init(models["dit"], seed=2)))
    ckpt.save(step_dir / "frozen", {k: module_params(models[k]) for k in FROZEN_MODELS})
    ckpt.wait_until_finished()


@pytest.mark.slow   # three train() runs, ~2.5 min on 2 shared cores
def test_dpo_on_pairs_trains_and_resumes_exactly_after_sigterm(tmp_path, manifest):
    import os
    import subprocess
    import sys

    import orbax.checkpoint as ocp

    from avatarv_jax.training.checkpoints import resolve_step_dir

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=root), str(tmp_path),
                           str(manifest[0])], env=env, capture_output=True, text=True,
                          timeout=900, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    (result,) = [line.split()[1:] for line in proc.stdout.splitlines()
                 if line.startswith("RESULT")]
    n = str(RESUME_STEPS)
    assert result[:2] == [n, "done"] and result[3] == "sigterm" and result[4:] == [n, "done"]
    assert 1 <= int(result[2]) < RESUME_STEPS

    def items(workdir):
        step_dir = resolve_step_dir(workdir)
        assert step_dir.name == n
        return {item: ocp.StandardCheckpointer().restore(step_dir / item)
                for item in ("params", "ema", "opt_state", "frozen")}

    a, b = items(tmp_path / "a"), items(tmp_path / "b")
    for item in a:
        la, lb = jax.tree.leaves(a[item]), jax.tree.leaves(b[item])
        assert len(la) == len(lb) > 0
        for x, y in zip(la, lb):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=item)
    start = ocp.StandardCheckpointer().restore(resolve_step_dir(tmp_path / "start") / "params")
    moved = [not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(start))]
    assert sum(moved) > len(moved) // 2
    for x, y in zip(jax.tree.leaves(a["frozen"]["teacher"]), jax.tree.leaves(start)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    logged = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text()
              .splitlines()]
    assert [r["step"] for r in logged if "margin" in r] == [1, 2, 3]
    assert math.isclose(logged[0]["loss"], math.log(2), abs_tol=1e-5)
    assert all(np.isfinite(r["loss"]) for r in logged)

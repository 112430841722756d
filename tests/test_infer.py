"""The inference pipeline end to end on the tiny config (32 px, few steps), and its bad inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import orbax.checkpoint as ocp
import pytest
import soundfile as sf
from flax import nnx

from avatarv_jax.config import get_model_config
from avatarv_jax.data.avatarworld import speech
from avatarv_jax.data.avatarworld.clip import make_clip
from avatarv_jax.data.avatarworld.media import write_mp4
from avatarv_jax.inference import InferenceInputError, Job, Pipeline
from avatarv_jax.inference import chunks as chunking
from avatarv_jax.inference.pipeline import prepare
from avatarv_jax.inference.weights import WeightsInfo, load_weights, random_models

REPO = Path(__file__).resolve().parents[1]
INFERENCE = dict(chunk_latents=3, prefix_latents=1, anchor_latents=1, ref_frames=9,
                 min_ref_frames=5, audio_context_frames=8, resolution=(32, 32),
                 max_text_length=16)


def tiny_config(**inference):
    cfg = get_model_config("tiny")
    cfg.inference = ml_collections.ConfigDict({**INFERENCE, **inference})
    cfg.sampling.num_steps = 1
    return cfg


@pytest.fixture(scope="module")
def cfg():
    return tiny_config()


@pytest.fixture(scope="module")
def pipeline(cfg):
    # Every weight non-zero: zero-initialised projections (audio, motion head) would hide paths.
    return Pipeline(cfg, random_models(cfg), WeightsInfo("random"), log=lambda m: None)


def _speech(seconds, seed=0):
    rng = np.random.default_rng(seed)
    return speech.make_speech(rng, int(seconds * 16000), "en", "m3", 50, 160,
                              backend="synthetic").audio


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    clip = make_clip(1, identity_id=2, scene_id=1, resolution=32, num_frames=9,
                     speech_backend="synthetic")
    write_mp4(str(d / "ref.mp4"), clip.frames, clip.audio)
    np.savez(d / "ref.motion.npz", motion=clip.motion)
    short = make_clip(2, identity_id=2, scene_id=1, resolution=32, num_frames=3,
                      speech_backend="synthetic")
    write_mp4(str(d / "short.mp4"), short.frames, short.audio)
    sf.write(d / "speech3.wav", _speech(3.0), 16000, subtype="FLOAT")
    sf.write(d / "speech1.wav", _speech(1.0, 1), 16000, subtype="FLOAT")
    sf.write(d / "silent.wav", np.zeros(16000, np.float32), 16000)
    sf.write(d / "empty.wav", np.zeros(0, np.float32), 16000)
    (d / "garbage.mp4").write_bytes(b"this is not a video" * 50)
    with av.open(str(d / "novideo.mp4"), "w") as c:      # an mp4 with sound and no picture
        s = c.add_stream("aac", rate=16000)
        s.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        for p in list(s.encode(frame)) + list(s.encode()):
            c.mux(p)
    # an mp4 whose video data is zeroed: the container opens, no frame decodes
    write_mp4(str(d / "noframes.mp4"), clip.frames, None)
    data = bytearray((d / "noframes.mp4").read_bytes())
    start, end = data.index(b"mdat") + 4, data.index(b"moov") - 4
    data[start:end] = bytes(end - start)
    (d / "noframes.mp4").write_bytes(bytes(data))
    return {p.stem: str(p) for p in d.iterdir()}


# -- end to end ---------------------------------------------------------------------------------

def test_end_to_end_mp4_matches_the_audio(pipeline, files, tmp_path):
    out = tmp_path / "avatar.mp4"
    record = pipeline.run(Job(reference=files["ref"], audio=files["speech3"], output=str(out),
                              prompt="a person in a room"), progress=False)
    with av.open(str(out)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        decoded = sum(1 for _ in c.decode(v))
        assert abs(decoded - 75) <= 1 and v.frames == 75
        assert (v.width, v.height, v.average_rate) == (32, 32, 25)
        assert a.codec_context.name == "aac" and v.codec_context.name == "h264"
        assert a.duration * a.time_base == pytest.approx(3.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avatar.mp4", "avatar.mp4.json"]
    sidecar = json.loads((tmp_path / "avatar.mp4.json").read_text())
    assert sidecar == json.loads(json.dumps(record))
    assert sidecar["output"]["frames"] == 75 and sidecar["seed"] == 0
    assert sidecar["chunks"] == len(chunking.plan_chunks(75, 3, 1)) == 10
    assert sidecar["reference"]["motion_source"].startswith("sidecar:")
    assert sidecar["inputs"]["prompt"] == "a person in a room"
    assert sidecar["config"]["name"] == "tiny" and sidecar["checkpoint"]["kind"] == "random"
    assert sidecar["timings"]["total_s"] > 0


def _generate(pipeline, prep, use_cache):
    latents, frames = [], []
    for chunk_frames in pipeline.frames(prep, use_cache=use_cache,
                                        on_chunk=lambda c, z: latents.append((c, z))):
        frames.append(chunk_frames)
    return latents, frames


def test_cached_generation_equals_uncached_and_chunks_join(pipeline, cfg, files, tmp_path):
    job = Job(reference=files["ref"], audio=files["speech1"], output=str(tmp_path / "x.mp4"),
              steps=2, seed=3)
    prep = prepare(job, cfg, log=lambda m: None)
    assert prep.num_frames == 25
    cached_latents, cached = _generate(pipeline, prep, True)
    joint_latents, joint = _generate(pipeline, prep, False)

    plan = chunking.plan_chunks(25, 3, 1)
    assert [c for c, _ in cached_latents] == list(plan.chunks) and len(plan) == 3
    for (_, a), (_, b) in zip(cached_latents, joint_latents):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4)
    assert np.abs(np.concatenate(cached).astype(int) - np.concatenate(joint)).max() <= 1

    # Chunk boundaries: the streamed chunks are exactly the decode of all new latents in one go.
    assert [len(f) for f in cached] == [c.frame_end - c.frame_start for c in plan.chunks]
    whole = jnp.concatenate([z for _, z in cached_latents], axis=1)
    video = np.asarray(pipeline.vae.decode(whole)[0])[:25]
    expected = np.round((video + 1.0) * 127.5).clip(0, 255)
    streamed = np.concatenate(cached)
    assert streamed.shape == (25, 32, 32, 3)
    assert np.abs(streamed.astype(int) - expected).max() <= 1
    # the seed matters, and the same seed repeats
    _, again = _generate(pipeline, prep, True)
    assert all(np.array_equal(a, b) for a, b in zip(cached, again))
    prep.job.seed = 4
    _, other = _generate(pipeline, prep, True)
    assert not np.array_equal(np.concatenate(other), streamed)


def test_frames_are_generated_lazily_chunk_by_chunk(pipeline, cfg, files, tmp_path):
    """Memory stays flat because nothing runs ahead: chunk k+1 is made only when asked for."""
    prep = prepare(Job(reference=files["ref"], audio=files["speech1"],
                       output=str(tmp_path / "x.mp4")), cfg, log=lambda m: None)
    made = []
    stream = pipeline.frames(prep, on_chunk=lambda c, z: made.append(c.index))
    assert made == []
    first = next(stream)
    assert made == [0] and first.shape == (9, 32, 32, 3)
    next(stream)
    assert made == [0, 1]
    stream.close()


def test_text_input_and_motion_reference(pipeline, cfg, files, tmp_path):
    if not speech.espeak_available():
        pytest.skip("espeak-ng not installed")
    job = Job(reference=files["ref"], text="Hi.", language="fr", voice="f2",
              motion_reference=files["ref"], output=str(tmp_path / "t.mp4"))
    prep = prepare(job, cfg, log=lambda m: None)
    assert prep.audio.rate == 16000 and prep.num_frames == round(prep.audio.seconds * 25)
    assert prep.ref_motion.source.startswith("sidecar:")
    no_motion = prepare(Job(reference=files["ref"], audio=files["speech1"],
                            output=str(tmp_path / "m.mp4")), cfg, motion_extractor=None,
                        log=lambda m: None)
    assert no_motion.ref_motion.source == "none" and not no_motion.ref_motion.motion.any()


# -- bad input ----------------------------------------------------------------------------------

BAD_JOBS = [
    (dict(reference="missing.mp4"), "reference video not found"),
    (dict(reference="garbage"), "cannot read reference video"),
    (dict(reference="novideo"), "has no video stream"),
    (dict(reference="noframes"), "has no decodable frames"),
    (dict(reference="short"), "too short: 3 frames \\(0.12 s at 25 fps\\); at least 5"),
    (dict(audio="missing.wav"), "audio file not found"),
    (dict(audio="garbage"), "cannot read audio file"),
    (dict(audio="silent"), "is silent"),
    (dict(audio="empty"), "is empty"),
    (dict(audio=None, text="Hello", language="xx-nope"), "unknown language 'xx-nope'"),
    (dict(audio=None), "exactly one of an audio file"),
    (dict(output_name="out.avi"), "must end in .mp4"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(resolution="40"), "multiples of 16"),
]


@pytest.mark.parametrize("change,message", BAD_JOBS, ids=[m for _, m in BAD_JOBS])
def test_bad_input_is_reported_before_anything_is_written(cfg, files, tmp_path, change,
                                                          message):
    if "language" in change and not speech.espeak_available():
        pytest.skip("espeak-ng not installed")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    values = dict(reference=files["ref"], audio=files["speech1"])
    values["output"] = str(out_dir / change.pop("output_name", "out.mp4"))
    for key, value in change.items():
        values[key] = files.get(value, str(tmp_path / value)) if key in ("reference", "audio") \
            and value is not None else value
    with pytest.raises(InferenceInputError, match=message):
        prepare(Job(**values), cfg, log=lambda m: None)
    assert list(out_dir.iterdir()) == []


def _save_converted(path, state: dict, dit_cfg):
    """A directory as ``python -m avatarv_jax.io.convert`` writes it, holding ``state``."""
    from avatarv_jax.io import convert
    path.mkdir()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path / convert.STATE, state)
    checkpointer.wait_until_finished()
    checkpointer.close()
    (path / convert.METADATA).write_text(json.dumps({
        "format": convert.FORMAT, "kind": "wan_dit", "source": "test",
        "config": convert.config_to_json(dit_cfg), "report": ""}))


def test_checkpoint_that_does_not_fit_the_config(pipeline, tmp_path):
    dit = nnx.clone(pipeline.dit)
    state = nnx.to_pure_dict(nnx.state(dit))
    wide = jax.tree.map(np.asarray, state)
    wide["proj_out"]["kernel"] = np.zeros((96, 64), np.float32)     # another width
    _save_converted(tmp_path / "wide", wide, dit.cfg)
    before = jax.tree.leaves(nnx.to_pure_dict(nnx.state(dit)))
    with pytest.raises(InferenceInputError,
                       match="(?s)does not match the config.s dit.*proj_out.kernel"):
        load_weights({"dit": dit}, tmp_path / "wide", log=lambda m: None)
    after = jax.tree.leaves(nnx.to_pure_dict(nnx.state(dit)))
    assert all(np.array_equal(a, b) for a, b in zip(before, after))   # nothing half-loaded

    # a converted checkpoint that fits restores its weights
    shifted = jax.tree.map(lambda x: np.asarray(x) + 1.0, state)
    _save_converted(tmp_path / "same", shifted, dit.cfg)
    info = load_weights({"dit": dit}, tmp_path / "same", log=lambda m: None)
    assert info.kind == "converted" and info.restored == ("dit",)
    np.testing.assert_array_equal(dit.proj_out.kernel[...], shifted["proj_out"]["kernel"])
    with pytest.raises(InferenceInputError, match="checkpoint not found"):
        load_weights({"dit": dit}, tmp_path / "nowhere", log=lambda m: None)


# -- the CLI ------------------------------------------------------------------------------------

def _infer(*args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(REPO / "infer.py"), *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_bad_input_exits_2_and_leaves_nothing(files, tmp_path):
    out = tmp_path / "o.mp4"
    proc = _infer("--reference", files["ref"], "--audio", files["silent"], "--output", str(out),
                  cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "error: audio file" in proc.stderr and "is silent" in proc.stderr
    proc = _infer("--reference", files["ref"], "--audio", files["speech1"], "--checkpoint",
                  str(tmp_path / "nope"), "--output", str(out), cwd=tmp_path)
    assert proc.returncode == 2 and "checkpoint not found" in proc.stderr, proc.stderr
    proc = _infer("--no-such-flag", cwd=tmp_path)
    assert proc.returncode == 2
    assert list(tmp_path.iterdir()) == []


# -- long runs (pytest -m slow) -----------------------------------------------------------------

@pytest.mark.slow
def test_sr_refiner_renders_at_full_resolution(files, tmp_path):
    cfg = tiny_config(resolution=(64, 64))
    sft_tiny = REPO / "tests" / "data" / "sft_tiny"      # a trained base model of this preset
    pipe = Pipeline.load(cfg, str(sft_tiny), sr=True, log=lambda m: None)
    prep = prepare(Job(reference=files["ref"], audio=files["speech1"],
                       output=str(tmp_path / "sr.mp4")), cfg, sr=True, log=lambda m: None)
    latents = []
    frames = np.concatenate(list(pipe.frames(prep, on_chunk=lambda c, z: latents.append(z))))
    assert frames.shape == (25, 64, 64, 3)
    assert all(z.shape[2:4] == (8, 8) for z in latents)   # SR latents: 64 px / 8
    with pytest.raises(InferenceInputError, match="multiples of 32"):
        prepare(Job(reference=files["ref"], audio=files["speech1"], resolution="48",
                    output=str(tmp_path / "x.mp4")), cfg, sr=True)


@pytest.mark.slow
def test_cli_renders_the_bundled_example_and_a_manifest(tmp_path):
    proc = _infer("--noprogress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "random weights" in proc.stderr or "demo checkpoint" in proc.stderr
    with av.open(str(tmp_path / "output.mp4")) as c:
        assert c.streams.video[0].frames == 75
    manifest = tmp_path / "jobs.jsonl"
    ref, wav = REPO / "examples" / "reference.mp4", REPO / "examples" / "speech.wav"
    manifest.write_text("\n".join(json.dumps(j) for j in [
        {"reference": str(ref), "audio": str(wav), "output": "a.mp4", "resolution": "32"},
        {"reference": "missing.mp4", "audio": str(wav), "output": "b.mp4"}]) + "\n")
    proc = _infer("--manifest", str(manifest), "--noprogress", cwd=tmp_path)
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert results[0]["ok"] and results[0]["frames"] == 75
    assert not results[1]["ok"] and "reference video not found" in results[1]["error"]
    assert (tmp_path / "a.mp4").is_file() and not (tmp_path / "b.mp4").exists()

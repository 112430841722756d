"""Memory stays flat as the output grows: peak RSS of a 60 s render within 10% of a 10 s one.

Each length runs in its own process (peak RSS only grows within a process), both at once, on
the tiny config at 32 px with one sampling step.
"""

import json
import os
import subprocess
import sys


SCRIPT = r"""
import json, resource, sys, time
import numpy as np
import soundfile as sf
import ml_collections
from avatarv_jax.config import get_model_config
from avatarv_jax.data.avatarworld import speech
from avatarv_jax.inference import Job, Pipeline
from avatarv_jax.inference.weights import WeightsInfo, random_models

seconds, reference, folder = float(sys.argv[1]), sys.argv[2], sys.argv[3]
cfg = get_model_config("tiny")
cfg.inference = ml_collections.ConfigDict(dict(chunk_latents=6, prefix_latents=1,
    anchor_latents=1, ref_frames=9, min_ref_frames=5, audio_context_frames=8,
    resolution=(32, 32), max_text_length=16))
cfg.sampling.num_steps = 1
cfg.sampling.text_scale = cfg.sampling.audio_scale = 1.0   # one pass per step
wave = speech.make_speech(np.random.default_rng(0), int(seconds * 16000), "en", "m3", 50, 160,
                          backend="synthetic").audio
audio = f"{folder}/speech_{seconds:g}.wav"
sf.write(audio, wave, 16000)
pipe = Pipeline(cfg, random_models(cfg), WeightsInfo("random"), log=lambda m: None)
t0 = time.perf_counter()
record = pipe.run(Job(reference=reference, audio=audio, output=f"{folder}/out_{seconds:g}.mp4"),
                  progress=False)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "frames": record["output"]["frames"], "chunks": record["chunks"],
                  "run_s": time.perf_counter() - t0}))
"""


def test_peak_memory_is_flat_in_output_length(tmp_path):
    from avatarv_jax.data.avatarworld.clip import make_clip
    from avatarv_jax.data.avatarworld.media import write_mp4

    clip = make_clip(1, identity_id=2, scene_id=1, resolution=32, num_frames=9,
                     speech_backend="synthetic")
    reference = tmp_path / "ref.mp4"
    write_mp4(str(reference), clip.frames, clip.audio)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = {s: subprocess.Popen([sys.executable, "-c", SCRIPT, str(s), str(reference),
                                  str(tmp_path)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env)
             for s in (10, 60)}
    results = {}
    for seconds, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        results[seconds] = json.loads(out.strip().splitlines()[-1])
    assert results[10]["frames"] == 250 and results[60]["frames"] == 1500
    assert results[60]["chunks"] > 5 * results[10]["chunks"]
    ratio = results[60]["peak_rss_mb"] / results[10]["peak_rss_mb"]
    print(json.dumps(results))
    assert ratio <= 1.10, results

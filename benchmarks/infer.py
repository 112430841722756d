"""Inference speed: seconds per output second, output frames per second, time to first frame.

    python benchmarks/infer.py                        # CPU: tiny config, 64 px, 4 steps, 10 s
    python benchmarks/infer.py --preset gpu           # 1.3B config, 480x832, 4 steps
    python benchmarks/infer.py --config configs/tiny.py --resolution 32 --seconds 4

Runs the real pipeline (``avatarv_jax.inference.Pipeline``) on the bundled example reference
with random weights (speed does not depend on the values; weights are drawn with numpy, which
skips compiling an initialiser per parameter shape). The same job runs twice: ``cold``
includes compilation, ``warm`` is the steady state a served model sees. With ``--preset gpu``
the umT5 text encoder keeps its width but runs 2 of its 24 layers (it runs once per video, so
it is no part of the per-frame cost; a full 5.7B random umT5 would only add load time).
Prints a table and writes ``benchmarks/results/infer_<platform>[_<preset>].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PRESETS = {
    "cpu": dict(config="tiny", resolution="64", steps=4, seconds=10.0, text_layers=None),
    "gpu": dict(config="avatar_v_1_3b", resolution="480x832", steps=4, seconds=10.0,
                text_layers=2),
}


def run(config: str, resolution: str, steps: int, seconds: float, text_layers, sr: bool):
    import jax
    import soundfile as sf

    from avatarv_jax.config import get_model_config
    from avatarv_jax.data.avatarworld import speech
    from avatarv_jax.inference import Job, Pipeline
    from avatarv_jax.inference.weights import WeightsInfo, random_models

    if config.endswith(".py"):
        from avatarv_jax.io.convert import load_config_file
        cfg = load_config_file(config)
    else:
        cfg = get_model_config(config)
    load = os.getloadavg()[0]       # other work on the machine slows every figure
    t0 = time.perf_counter()
    models = random_models(cfg, text_layers=text_layers)
    build_s = time.perf_counter() - t0
    pipe = Pipeline(cfg, models, WeightsInfo("random"), log=lambda m: None)
    scratch = tempfile.TemporaryDirectory(prefix="infer_bench_")
    tmp = Path(scratch.name)
    wave = speech.make_speech(np.random.default_rng(0), int(seconds * 16000), "en", "m3", 50,
                              160, backend="synthetic").audio
    sf.write(tmp / "speech.wav", wave, 16000)
    job = dict(reference=str(REPO / "examples" / "reference.mp4"), audio=str(tmp / "speech.wav"),
               steps=steps, resolution=resolution)
    runs = {}
    for name in ("cold", "warm"):
        record = pipe.run(Job(output=str(tmp / f"{name}.mp4"), **job), progress=False)
        t = record["timings"]
        frames = record["output"]["frames"]
        gen_s = t["total_s"] - t["read_inputs_s"]
        runs[name] = {"total_s": t["total_s"], "time_to_first_frame_s": t["first_chunk_s"],
                      "output_fps": frames / gen_s,
                      "seconds_per_output_second": t["seconds_per_output_second"],
                      "chunks": record["chunks"], "frames": frames}
    scratch.cleanup()
    dev = jax.devices()[0]
    return {
        "benchmark": "infer", "config": cfg.name, "resolution": resolution, "steps": steps,
        "audio_seconds": seconds, "text_encoder_layers": text_layers or "all",
        "guidance_passes": 3 if (cfg.sampling.text_scale, cfg.sampling.audio_scale) != (1, 1)
        else 1, "inference": record["inference"],
        "device": f"{dev.platform}: {dev.device_kind}", "cpu": platform.machine(),
        "cpu_count": os.cpu_count(), "load_average_at_start": load,
        "jax": jax.__version__, "build_models_s": build_s, "runs": runs}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--config", help="preset name (tiny, avatar_v_1_3b) or config file")
    parser.add_argument("--resolution")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/infer_<...>.json)")
    args = parser.parse_args(argv)
    values = dict(PRESETS[args.preset])
    for name in ("config", "resolution", "steps", "seconds"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    result = run(values["config"], values["resolution"], values["steps"], values["seconds"],
                 values["text_layers"], sr=False)
    result["preset"] = args.preset
    for name, r in result["runs"].items():
        print(f"{result['config']} {result['resolution']} {result['steps']} steps on "
              f"{result['device']} [{name}]: {r['seconds_per_output_second']:.2f} s per output "
              f"second, {r['output_fps']:.2f} output fps, first frame after "
              f"{r['time_to_first_frame_s']:.2f} s ({r['frames']} frames, {r['chunks']} chunks)")
    import jax
    out = Path(args.out) if args.out else RESULTS / (
        f"infer_{jax.default_backend()}" + ("" if args.preset == "cpu" else f"_{args.preset}")
        + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

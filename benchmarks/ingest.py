"""Real-video ingestion throughput per core: frames/s and clips/min, and where the time goes.

    python benchmarks/ingest.py            # prints, and saves JSON to benchmarks/results/
    python benchmarks/ingest.py --quick    # two short sources, for a smoke run

Needs the `faces` extra and scikit-image (the footage is skimage's astronaut filmed along a
panning, zooming camera path, 360 x 360 at 25 fps with speech, H.264 + AAC). The plain runner
is one process; PyAV may decode on extra threads, so besides wall-clock figures the script
reports CPU time, and "per core" figures divide frames by CPU seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


from avatarv_jax.data.avatarworld import speech
from avatarv_jax.data.ingest import (
    faces,
    filters,
    landmark_motion,
    masks,
    records,
    scenes,
    video,
)
from avatarv_jax.data.ingest import sample_footage as sf
from avatarv_jax.data.ingest.config import IngestConfig
from avatarv_jax.data.ingest.plain import ingest_plain
from avatarv_jax.tools.bench_io import host_info, write_json

SOURCE_SIZE = 360


def device_info() -> dict:
    import dlib
    return host_info(dlib=dlib.__version__, espeak_ng=speech.espeak_available())


def make_sources(directory: str, count: int, seconds: float) -> int:
    from skimage import data

    image = data.astronaut()
    t = round(seconds * 25)
    for k in range(count):
        path = sf.camera_path(t, sway=(30.0 + 5 * k, 12.0))
        frames = sf.render_path(image, path, SOURCE_SIZE)
        sf.write_footage(os.path.join(directory, f"talk{k:02d}.mp4"), frames,
                         sf.speech_track(t, seed=k))
    return t * count


def timed(fn, *args):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - w, time.process_time() - c


def bench_run(src: str, cfg: IngestConfig) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        manifest, wall, cpu = timed(lambda: ingest_plain(src, os.path.join(tmp, "out"), cfg,
                                                         log=lambda _: None))
        frames = sum(c["num_frames"] for c in manifest["clips"])
        _, rerun_wall, _ = timed(lambda: ingest_plain(src, os.path.join(tmp, "out"), cfg,
                                                      log=lambda _: None))
    return {"longest_side": cfg.longest_side, "detect_every": cfg.detect_every,
            "detector_upsample": cfg.detector_upsample,
            "sources": manifest["num_sources"], "clips": manifest["num_clips"],
            "frames": frames, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "frames_per_second_wall": round(frames / wall, 1),
            "frames_per_cpu_second": round(frames / cpu, 1),
            "clips_per_minute_per_core": round(manifest["num_clips"] / cpu * 60, 1),
            "rerun_skip_wall_s": round(rerun_wall, 2)}


def bench_stages(path: str, cfg: IngestConfig) -> dict:
    """CPU seconds per stage on one source, and per frame."""
    models = faces.shared_models()
    stages = {}
    fo, _, stages["decode"] = timed(video.decode, path, cfg)
    d, _, stages["scene_cuts"] = timed(scenes.frame_differences, fo.frames)
    track, _, stages["face_track"] = timed(faces.track_faces, fo.frames, models, cfg)
    run = slice(*track.runs()[0])
    fr, boxes = fo.frames[run], track.boxes[run]
    lm, _, stages["landmarks"] = timed(faces.track_landmarks, fr, boxes, models)
    _, _, stages["motion"] = timed(landmark_motion.motion_from_landmarks, lm, fr.shape[1:3])
    reg, _, stages["masks"] = timed(masks.region_masks, lm, fr.shape[1:3])
    _, _, stages["filters"] = timed(filters.run_rejection, fr, boxes, track.face_counts[run],
                                    d[run], fo.source_fps, cfg)
    _, _, stages["embedding"] = timed(faces.track_embedding, fr, boxes, models,
                                      cfg.embedding_frames)
    from avatarv_jax.data.identity_graph import background_descriptor, evenly_spaced
    sel = evenly_spaced(len(fr), cfg.background_frames)
    _, _, stages["background"] = timed(background_descriptor, fr[sel], reg["face"][sel])
    n = fo.num_frames
    return {"frames": n, "longest_side": cfg.longest_side,
            "cpu_ms_per_frame": {k: round(v / n * 1e3, 3) for k, v in stages.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "ingest_cpu.json"))
    args = parser.parse_args(argv)
    count, seconds = (2, 4.0) if args.quick else (4, 10.0)
    with tempfile.TemporaryDirectory() as src:
        source_frames = make_sources(src, count, seconds)
        faces.shared_models()  # load dlib's weights outside the timings
        runs = [bench_run(src, IngestConfig(longest_side=s, detect_every=e, detector_upsample=u))
                for s, e, u in ((256, 2, 1), (256, 1, 1), (256, 2, 0), (128, 2, 1))]
        stages = [bench_stages(os.path.join(src, "talk00.mp4"), IngestConfig(longest_side=s))
                  for s in (256, 128)]
    result = {"device": device_info(),
              "footage": {"sources": count, "seconds_each": seconds, "source_frames": source_frames,
                          "source_size": [SOURCE_SIZE, SOURCE_SIZE], "codec": "h264+aac"},
              "runs": runs, "stages": stages, "record_version": records.RECORD_VERSION}
    print(json.dumps(result, indent=1))
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

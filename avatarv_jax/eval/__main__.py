"""``python -m avatarv_jax.eval``: evaluate generated videos beside the baselines.

    # held-out AvatarWorld cases; baselines always, generated mp4s if given (DIR/case_000.mp4 ...)
    python -m avatarv_jax.eval --avatarworld 20 --seconds 30 --out reports/aw [--generated DIR]
    # real videos: GEN_DIR/NAME.mp4 against REF_DIR/NAME.mp4 (dlib faces; the `faces` extra)
    python -m avatarv_jax.eval GEN_DIR --references REF_DIR --out reports/real
    # ... with LSE from the original SyncNet (the papers' numbers; weights converted once)
    python -m avatarv_jax.eval GEN_DIR --references REF_DIR --syncnet-original syncnet_v2.safetensors --out reports/real
    # the inputs of the AvatarWorld cases, to generate from (reference PNG, reference clip with
    # its motion sidecar, speech WAV)
    python -m avatarv_jax.eval --avatarworld 20 --export-cases cases/

Bad input exits with status 2 and one line on stderr; the report is written whole or not at all.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from avatarv_jax.eval import baselines as bl


class EvalInputError(ValueError):
    """Input the evaluation cannot use (missing files, wrong sizes, unknown options)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m avatarv_jax.eval", description=__doc__.split("\n")[0])
    p.add_argument("generated", nargs="?", help="directory of generated mp4s (real-video mode)")
    p.add_argument("--references", help="directory of reference mp4s with the same names")
    p.add_argument("--avatarworld", type=int, metavar="N", help="N held-out AvatarWorld cases")
    p.add_argument("--generated-dir", dest="generated_dir",
                   help="AvatarWorld mode: generated mp4s named <case>.mp4")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--window", type=float, default=5.0, help="drift window in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--syncnet", help="SyncNet safetensors (default: the shipped AvatarWorld one)")
    p.add_argument("--syncnet-original", dest="syncnet_original", metavar="PATH",
                   help="the original SyncNet (syncnet_v2, converted to safetensors; "
                        "docs/evaluation.md): LSE-C/D on face crops with the papers' protocol "
                        "(real-video mode)")
    p.add_argument("--export-cases", help="write the cases' inputs here: reference PNG (frame 0), "
                   "a 2-s reference clip of the same person (mp4, with its motion as a .motion.npz "
                   "sidecar) and the speech WAV")
    p.add_argument("--out", help="report directory (must not exist)")
    return p


def _read_mp4(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Frames at 25 fps (native size) and 16 kHz mono audio aligned to them."""
    import av

    from avatarv_jax.inference.errors import InferenceInputError
    from avatarv_jax.inference.media import read_video

    try:
        with av.open(path) as c:
            if not c.streams.video:
                raise EvalInputError(f"{path} has no video stream")
            s = c.streams.video[0]
            size = (s.codec_context.height, s.codec_context.width)
        clip = read_video(path, size, max_frames=10 ** 7, what="video")
    except (av.FFmpegError, InferenceInputError) as e:
        raise EvalInputError(f"cannot read {path}: {e}") from None
    if clip.audio is None:
        raise EvalInputError(f"{path} has no audio track (lip sync needs the sound)")
    return clip.frames, clip.audio


def _mp4s(directory: str, what: str) -> dict[str, str]:
    if not os.path.isdir(directory):
        raise EvalInputError(f"{what} directory {directory} does not exist")
    found = {os.path.splitext(n)[0]: os.path.join(directory, n)
             for n in sorted(os.listdir(directory)) if n.lower().endswith(".mp4")}
    if not found:
        raise EvalInputError(f"{what} directory {directory} holds no .mp4 file")
    return found


def _sync_scorer(args):
    """The LSE scorer: the original SyncNet when ``--syncnet-original`` names one, else ours."""
    from avatarv_jax.eval import syncnet

    path = getattr(args, "syncnet_original", None)
    if not path:
        return syncnet.SyncScorer(syncnet.load_syncnet(args.syncnet))
    from avatarv_jax.eval import syncnet_original

    if args.syncnet:
        raise EvalInputError("give --syncnet or --syncnet-original, not both")
    try:
        return syncnet_original.OriginalSyncScorer(syncnet_original.load_original_syncnet(path))
    except (FileNotFoundError, ValueError) as e:
        raise EvalInputError(f"--syncnet-original: {e}") from None


def run_avatarworld(args, log=print) -> dict:
    from avatarv_jax.data.avatarworld.probe import load_probe
    from avatarv_jax.eval import avatarworld_eval as awe
    from avatarv_jax.eval import report, syncnet

    if getattr(args, "syncnet_original", None):
        raise EvalInputError("--syncnet-original scores real videos (face crops); AvatarWorld "
                             "mode uses the AvatarWorld SyncNet (--syncnet)")
    if args.avatarworld < 2:
        raise EvalInputError("--avatarworld needs at least 2 cases (shuffled audio pairs them)")
    try:
        cases = awe.heldout_cases(args.avatarworld, args.seconds, args.resolution, args.seed)
    except ValueError as e:
        raise EvalInputError(str(e)) from None
    generated = _mp4s(args.generated_dir, "generated") if args.generated_dir else None
    if generated is not None:
        missing = [c.name for c in cases if c.name not in generated]
        if missing:
            raise EvalInputError(f"generated directory lacks {missing[0]}.mp4 "
                                 f"({len(missing)} of {len(cases)} cases missing)")
    probe = load_probe()
    ev = awe.AvatarWorldEvaluator(probe, syncnet.SyncScorer(syncnet.load_syncnet(args.syncnet)),
                                  window_s=args.window)
    t0 = time.time()
    truths = [awe.render_case(c, probe) for c in cases]
    log(f"rendered {len(cases)} cases in {time.time() - t0:.0f}s")
    inputs = bl.baseline_inputs([t.clip.frames for t in truths], [t.clip.audio for t in truths],
                                [t.reference_frame for t in truths], args.seed)
    if generated is not None:
        gen = []
        for t in truths:
            frames, audio = _read_mp4(generated[t.case.name])
            if frames.shape[1:] != t.clip.frames.shape[1:]:
                raise EvalInputError(f"{generated[t.case.name]} is {frames.shape[2]}x"
                                     f"{frames.shape[1]}, the case is {args.resolution} px")
            gen.append((frames, audio))
        inputs = {"generated": gen, **inputs}
    per_clip, series, langs = {}, {}, {}
    t1 = time.time()
    for system, items in inputs.items():
        per_clip[system], series[system], langs[system] = [], [], []
        for t, (frames, audio) in zip(truths, items):
            m, s = ev.score(t, frames, audio)
            per_clip[system].append({"case": t.case.name, **m})
            series[system].append(s)
            langs[system].append(t.case.language)
        log(f"scored {system}")
    scored = sum(len(v) for v in inputs.values())
    meta = {"mode": "avatarworld", "cases": [c.__dict__ for c in cases],
            "seconds": args.seconds, "resolution": args.resolution,
            "score_seconds": time.time() - t1, "clips_scored": scored,
            "syncnet": args.syncnet or "shipped"}
    out = report.write_report(args.out, per_clip, series, langs, meta, args.window)
    log(f"report in {args.out}")
    return out


def run_videos(args, log=print) -> dict:
    from avatarv_jax.data.ingest.faces import faces_available, FACES_EXTRA_HINT
    from avatarv_jax.eval import face_similarity as fs
    from avatarv_jax.eval import frontends as fe
    from avatarv_jax.eval import lse, report

    if not args.references:
        raise EvalInputError("real-video mode needs --references DIR")
    scorer = _sync_scorer(args)
    original = getattr(args, "syncnet_original", None)
    if not faces_available():
        raise EvalInputError(FACES_EXTRA_HINT)
    gen, ref = _mp4s(args.generated, "generated"), _mp4s(args.references, "reference")
    names = [n for n in gen if n in ref]
    if not names:
        raise EvalInputError("no generated mp4 has a reference mp4 of the same name")
    if len(names) < 2:
        raise EvalInputError("need at least 2 matched videos (shuffled audio pairs them)")
    embedder = fs.DlibEmbedder()
    from avatarv_jax.data.ingest.faces import shared_models
    models = shared_models()

    def mouth_box(frames):
        lms = np.full((frames.shape[0], 68, 2), np.nan, np.float32)
        for i in np.linspace(0, frames.shape[0] - 1, min(16, frames.shape[0])).astype(int):
            boxes = models.detect(frames[i], 1, -0.5)
            if len(boxes):
                lms[i] = models.landmarks(frames[i], boxes[0])
        return fe.mouth_box_from_landmarks(lms)

    def face_box(frames):
        """The original network reads face crops: one box per clip, the median dlib face box."""
        boxes = []
        for i in np.linspace(0, frames.shape[0] - 1, min(16, frames.shape[0])).astype(int):
            found = models.detect(frames[i], 1, -0.5)
            if len(found):
                boxes.append(found[0])
        if not boxes:
            raise ValueError("no face found")
        return np.median(np.stack(boxes), 0)

    refs = {n: _read_mp4(ref[n]) for n in names}
    inputs = bl.baseline_inputs([refs[n][0] for n in names], [refs[n][1] for n in names],
                                [refs[n][0][0] for n in names], args.seed)
    inputs = {"generated": [_read_mp4(gen[n]) for n in names], **inputs}
    per_clip = {}
    for system, items in inputs.items():
        per_clip[system] = []
        for n, (frames, audio) in zip(names, items):
            try:
                box = (face_box if original else mouth_box)(np.asarray(frames))
            except ValueError:
                box = None
            m = {"case": n}
            if box is not None:
                m.update(lse.clip_sync(scorer, np.asarray(frames), audio, box).as_dict())
            m.update(fs.face_similarity(frames, refs[n][0], embedder))
            per_clip[system].append(m)
        log(f"scored {system}")
    meta = {"mode": "videos", "names": names,
            "syncnet": f"original:{original}" if original else args.syncnet or "shipped"}
    out = report.write_report(args.out, per_clip, None, None, meta, args.window)
    log(f"report in {args.out}")
    return out


def export_cases(args, log=print) -> None:
    import soundfile

    from avatarv_jax.data.avatarworld.media import write_mp4, write_png
    from avatarv_jax.eval import avatarworld_eval as awe
    from avatarv_jax.inference.motion_source import sidecar_path

    try:
        cases = awe.heldout_cases(args.avatarworld, args.seconds, args.resolution, args.seed)
    except ValueError as e:
        raise EvalInputError(str(e)) from None
    os.makedirs(args.export_cases, exist_ok=True)
    from avatarv_jax.data.avatarworld import make_clip
    for c in cases:
        clip = make_clip(c.seed, c.identity_id, c.scene_id, c.language, duration_s=c.seconds,
                         resolution=c.resolution)
        write_png(os.path.join(args.export_cases, f"{c.name}.png"), clip.frames[0])
        ref = awe.render_reference_clip(c)
        ref_path = os.path.join(args.export_cases, f"{c.name}_reference.mp4")
        write_mp4(ref_path, ref.frames, ref.audio)
        # its exact motion as the sidecar infer.py reads (no extractor needed on AvatarWorld)
        sidecar = str(sidecar_path(ref_path))
        with open(sidecar + ".partial", "wb") as f:
            np.savez(f, motion=np.asarray(ref.motion, np.float32))
        os.replace(sidecar + ".partial", sidecar)
        wav = os.path.join(args.export_cases, f"{c.name}.wav")
        soundfile.write(wav + ".partial.wav", clip.audio, 16000)
        os.replace(wav + ".partial.wav", wav)
    log(f"wrote {len(cases)} cases to {args.export_cases}")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.avatarworld is not None and args.export_cases:
            export_cases(args)
            return 0
        if args.avatarworld is None and not args.generated:
            raise EvalInputError("give a directory of generated mp4s or --avatarworld N")
        if not args.out:
            raise EvalInputError("--out DIR is required")
        if os.path.exists(args.out):
            raise EvalInputError(f"--out {args.out} already exists")
        if args.avatarworld is not None:
            if args.generated:
                raise EvalInputError("give AvatarWorld generations with --generated-dir")
            run_avatarworld(args)
        else:
            run_videos(args)
    except EvalInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ImportError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

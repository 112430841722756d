"""Grain pipelines per stage: batch contract, content alignment, determinism, sharding, resume."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from avatarv_jax.data.avatarworld import AvatarWorldDataset, ShardWriter, make_clip
from avatarv_jax.data.pipelines import default_data_config, make_pipeline
from avatarv_jax.data.pipelines.transforms import crop_resize_video, resize_weights
from avatarv_jax.models.tokenizer import ByteTokenizer

FRAMES, REF_FRAMES, RES, BATCH, TEXT = 9, 5, 64, 4, 24


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """8 people x 3 clips (13 frames, 64 px), scenes all different: 48 SFT pairs."""
    out = str(tmp_path_factory.mktemp("pipelines") / "aw")
    writer = ShardWriter(out, clips_per_shard=7)
    for k in range(24):
        writer.add(make_clip(k, identity_id=2 * (k // 3), scene_id=5 * k + 1, num_frames=13,
                             resolution=RES, speech_backend="synthetic"))
    writer.close()
    ds = AvatarWorldDataset(out)
    clips = list(ds)
    ds.close()
    return out, clips


def config(shards, **overrides):
    cfg = default_data_config()
    cfg.shards, cfg.batch_size, cfg.frames, cfg.ref_frames, cfg.text_length = \
        shards, BATCH, FRAMES, REF_FRAMES, TEXT
    cfg.update(overrides)
    return cfg


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def locate(clips, video):
    """(clip index, start) of a window of frames, by exact match; None if nowhere."""
    for ci, c in enumerate(clips):
        for s in range(c.num_frames - video.shape[0] + 1):
            if np.array_equal(c.frames[s:s + video.shape[0]], video):
                return ci, s
    return None


EXPECTED = {
    "t2v": {"video": ((FRAMES, RES, RES, 3), np.uint8)},
    "a2v": {"video": ((FRAMES, RES, RES, 3), np.uint8), "audio": ((FRAMES * 640,), np.float32),
            "ref_video": ((1, RES, RES, 3), np.uint8)},
    "sft": {"video": ((FRAMES, RES, RES, 3), np.uint8), "audio": ((FRAMES * 640,), np.float32),
            "motion": ((FRAMES, 10), np.float32),
            **{m: ((FRAMES, RES, RES), np.bool_) for m in ("mask_face", "mask_mouth",
                                                            "mask_eyes")},
            "ref_video": ((REF_FRAMES, RES, RES, 3), np.uint8),
            "ref_audio": ((REF_FRAMES * 640,), np.float32),
            "ref_motion": ((REF_FRAMES, 10), np.float32)},
}


@pytest.mark.parametrize("stage", ["t2v", "a2v", "sft"])
def test_batches_follow_the_contract_and_the_clips(world, stage):
    shards, clips = world
    batch = take(make_pipeline(config(shards), stage, seed=0), 1)[0]
    want = {**EXPECTED[stage], "text_ids": ((TEXT,), np.int32), "text_mask": ((TEXT,), np.bool_),
            "identity_id": ((), np.int32)}
    assert sorted(batch) == sorted(want)
    for k, (shape, dtype) in want.items():
        assert batch[k].shape == (BATCH, *shape), k
        assert batch[k].dtype == dtype, k
    tok = ByteTokenizer()
    for b in range(BATCH):
        ci, s = locate(clips, batch["video"][b])            # a real window of a real clip
        clip = clips[ci]
        assert batch["identity_id"][b] == clip.identity_id
        assert tok.decode(batch["text_ids"][b]) == clip.caption[:TEXT - 1]
        assert batch["text_mask"][b].all()                  # captions are longer than L
        if stage == "t2v":
            continue
        np.testing.assert_array_equal(batch["audio"][b], clip.audio[s * 640:(s + FRAMES) * 640])
        if stage == "a2v":
            assert any(np.array_equal(batch["ref_video"][b, 0], f) for f in clip.frames)
            continue
        np.testing.assert_array_equal(batch["motion"][b], clip.motion[s:s + FRAMES])
        np.testing.assert_array_equal(batch["mask_mouth"][b], clip.masks["mouth"][s:s + FRAMES])
        rc, rs = locate(clips, batch["ref_video"][b])
        ref = clips[rc]
        assert rc != ci and ref.identity_id == clip.identity_id and ref.scene_id != clip.scene_id
        np.testing.assert_array_equal(batch["ref_audio"][b],
                                      ref.audio[rs * 640:(rs + REF_FRAMES) * 640])
        np.testing.assert_array_equal(batch["ref_motion"][b], ref.motion[rs:rs + REF_FRAMES])


def test_audio_context_frames_widen_the_gen_audio_only(world):
    """``audio_context_frames`` puts that many frames of the clip's audio (zeros past its ends)
    either side of the window's own; the SFT reference keeps its own frames' audio, as
    inference encodes it."""
    shards, clips = world
    m = 3
    batch = take(make_pipeline(config(shards, audio_context_frames=m), "sft", seed=0), 1)[0]
    assert batch["audio"].shape == (BATCH, (FRAMES + 2 * m) * 640)
    assert batch["ref_audio"].shape == (BATCH, REF_FRAMES * 640)
    for b in range(BATCH):
        ci, s = locate(clips, batch["video"][b])
        padded = np.pad(clips[ci].audio, (m * 640, m * 640))
        np.testing.assert_array_equal(batch["audio"][b],
                                      padded[s * 640:(s + FRAMES + 2 * m) * 640])


def test_sft_pairs_cover_every_graph_edge(world):
    """One epoch of SFT visits each (target, reference) pair of the identity graph once."""
    shards, clips = world
    loader = make_pipeline(config(shards, shuffle=False, num_epochs=1, batch_size=8), "sft",
                           seed=0)
    pairs = []
    for batch in loader:
        for b in range(8):
            pairs.append((locate(clips, batch["video"][b])[0],
                          locate(clips, batch["ref_video"][b])[0]))
    truth = {(i, j) for i in range(24) for j in range(24) if i != j and i // 3 == j // 3}
    assert len(pairs) == 48 and set(pairs) == truth


def test_crops_and_resizing(world):
    shards, _ = world
    batch = take(make_pipeline(config(shards, resolution=32, crop_scale=(0.5, 0.9)), "sft",
                               seed=1), 1)[0]
    assert batch["video"].shape == (BATCH, FRAMES, 32, 32, 3)
    assert batch["ref_video"].shape == (BATCH, REF_FRAMES, 32, 32, 3)
    assert batch["mask_face"].shape == (BATCH, FRAMES, 32, 32)
    assert batch["mask_face"].any() and not batch["mask_face"].all()


def test_resize_matches_pillow_bilinear():
    pil = pytest.importorskip("PIL.Image")
    img = np.random.default_rng(0).integers(0, 256, (1, 48, 48, 3), dtype=np.uint8)
    ours = crop_resize_video(img, (4, 6, 40), 24)[0]
    ref = np.asarray(pil.fromarray(img[0, 4:44, 6:46]).resize((24, 24), pil.BILINEAR))
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1
    np.testing.assert_allclose(resize_weights(40, 24).sum(1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(resize_weights(8, 8), np.eye(8, dtype=np.float32))


def test_same_seed_same_batches_other_seed_other_batches(world):
    shards, _ = world
    a = take(make_pipeline(config(shards), "a2v", seed=7), 3)
    b = take(make_pipeline(config(shards), "a2v", seed=7), 3)
    c = take(make_pipeline(config(shards), "a2v", seed=8), 3)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert not all(np.array_equal(x["video"], z["video"]) for x, z in zip(a, c))


def test_hosts_read_disjoint_halves(world):
    shards, clips = world
    seen = []
    for host in range(2):
        loader = make_pipeline(config(shards, shuffle=False, num_epochs=1), "t2v", seed=0,
                               process_index=host, process_count=2)
        ids = [locate(clips, v)[0] for batch in loader for v in batch["video"]]
        assert len(ids) == 12                   # 24 clips / 2 hosts, batches of 4 / 2
        seen.append(set(ids))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(24))


def test_worker_processes_reorder_but_keep_examples(world):
    """Two workers batch their own examples: the same examples, grouped differently."""
    shards, _ = world

    def examples(workers):
        batches = take(make_pipeline(config(shards, worker_count=workers), "a2v", seed=3), 2)
        return sorted(bytes(v) + bytes(a) for b in batches
                      for v, a in zip(b["video"], b["audio"]))

    assert examples(2) == examples(0)


_RESUME = textwrap.dedent("""
    import sys, numpy as np, grain, orbax.checkpoint as ocp
    from avatarv_jax.data.pipelines import default_data_config, make_pipeline
    shards, ckpt, out, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    cfg = default_data_config()
    cfg.update(dict(shards=shards, batch_size=4, frames=9, ref_frames=5, text_length=24,
                    worker_count=workers))
    it = iter(make_pipeline(cfg, "sft", seed=11))
    mngr = ocp.CheckpointManager(ckpt, item_handlers={"data": grain.checkpoint.CheckpointHandler()})
    mngr.restore(mngr.latest_step(), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it)))
    batches = [next(it) for _ in range(3)]
    np.savez(out, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
""")


@pytest.mark.parametrize("workers", [0, 1])
def test_iterator_state_restores_exactly_in_a_new_process(world, tmp_path, workers):
    import grain
    import orbax.checkpoint as ocp

    shards, _ = world
    it = iter(make_pipeline(config(shards, worker_count=workers), "sft", seed=11))
    for _ in range(5):                                   # mid-epoch (48 pairs, 4 per batch)
        next(it)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"),
                                 item_handlers={"data": grain.checkpoint.CheckpointHandler()})
    mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = [next(it) for _ in range(3)]
    out = tmp_path / "next.npz"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _RESUME, shards, str(tmp_path / "ckpt"),
                           str(out), str(workers)], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out, allow_pickle=False) as got:
        for i, batch in enumerate(expected):
            for k, v in batch.items():
                np.testing.assert_array_equal(got[f"{i}/{k}"], v, err_msg=f"batch {i} {k}")


@pytest.mark.parametrize("overrides, message", [
    (dict(frames=8), r"1 \+ 4k"),
    (dict(batch_size=3), "multiple of the process count"),
    (dict(crop_scale=(0.9, 0.5)), "crop_scale"),
    (dict(frames=17), "no clip"),
    (dict(resolution=30), "multiple of 8"),
    (dict(audio_context_frames=-1), "audio_context_frames"),
])
def test_bad_settings_are_named(world, overrides, message):
    shards, _ = world
    with pytest.raises(ValueError, match=message):
        make_pipeline(config(shards, **overrides), "sft" if "batch_size" in overrides else "t2v",
                      seed=0, process_count=2 if "batch_size" in overrides else 1)


def test_bad_stage_field_and_directory(world, tmp_path):
    shards, _ = world
    with pytest.raises(ValueError, match="unknown stage"):
        make_pipeline(config(shards), "dpo", seed=0)
    cfg = config(shards).to_dict()
    cfg["frame"] = 9
    with pytest.raises(ValueError, match=r"unknown data config field\(s\) \['frame'\]"):
        make_pipeline(cfg, "t2v", seed=0)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        make_pipeline(config(str(tmp_path)), "t2v", seed=0)


def test_sft_graph_from_manifest_features_never_overwrites_another_graph(world, tmp_path):
    """Ingested sets store features per clip; a graph built with other thresholds stays put."""
    import json
    import shutil

    from avatarv_jax.data import identity_graph as ig
    from avatarv_jax.data.pipelines import sft_graph
    from avatarv_jax.data.pipelines.config import with_defaults
    from avatarv_jax.data.pipelines.sources import ShardSet

    shards, clips = world
    copy = tmp_path / "ingested"
    shutil.copytree(shards, copy, ignore=shutil.ignore_patterns("identity_graph*"))
    manifest = json.loads((copy / "manifest.json").read_text())
    rng = np.random.default_rng(0)
    people = rng.normal(size=(50, 16))
    for entry, clip in zip(manifest["clips"], clips):
        entry["face_embedding"] = (people[clip.identity_id] + 0.05 * rng.normal(size=16)).tolist()
        entry["background"] = rng.normal(size=8).tolist()          # every scene differs
    manifest["format"] = "ingested-for-this-test"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    foreign = ig.build_identity_graph(np.eye(24), np.eye(24), np.full(24, 13), face_threshold=0.5,
                                      background_threshold=0.5, min_frames=1)
    foreign.save(str(copy / "identity_graph.npz"))
    before = (copy / "identity_graph.npz").read_bytes()

    cfg = with_defaults(config(str(copy)))
    graph = sft_graph(cfg, ShardSet(str(copy)))
    assert graph.params["face_threshold"] == 0.82 and graph.params["min_frames"] == FRAMES
    ids = np.asarray([c.identity_id for c in clips])
    assert (ids[graph.edges[:, 0]] == ids[graph.edges[:, 1]]).all() and len(graph.edges) == 24
    assert (copy / "identity_graph.npz").read_bytes() == before
    cached = [p for p in os.listdir(copy) if p.startswith("identity_graph-")]
    assert len(cached) == 1
    again = sft_graph(cfg, ShardSet(str(copy)))                  # served from the cache
    np.testing.assert_array_equal(again.edges, graph.edges)

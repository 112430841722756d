"""AvatarWorld on disk: ArrayRecord round trips, the manifest, the CLI, mp4 and PNG files."""

import io
import json
import os
import struct
import zlib

import numpy as np
import pytest

from avatarv_jax.data.avatarworld import cli, media, shards
from avatarv_jax.data.avatarworld import render as rnd
from avatarv_jax.data.avatarworld.clip import make_clip


@pytest.fixture(scope="module")
def clips():
    return [make_clip(seed=k, identity_id=k, scene_id=k + 1, language=lang, num_frames=9,
                      resolution=64) for k, lang in enumerate(["en", "zh", "hi"])]


def _same(a, b):
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.motion, b.motion)
    assert np.array_equal(a.audio, b.audio)
    assert all(np.array_equal(a.masks[k], b.masks[k]) for k in shards.MASK_NAMES)
    assert np.array_equal(a.static_attributes, b.static_attributes)
    assert np.array_equal(a.dynamic_style, b.dynamic_style)
    for name in ("identity_id", "scene_id", "seed", "caption", "language", "transcript",
                 "speech_backend"):
        assert getattr(a, name) == getattr(b, name), name


def test_record_round_trip_without_pickle(clips):
    data = shards.clip_to_bytes(clips[2])
    with np.load(io.BytesIO(data), allow_pickle=False) as z:  # loads: nothing needs pickle
        assert z["frames"].dtype == np.uint8 and z["caption"].dtype.kind == "U"
    _same(shards.clip_from_bytes(data), clips[2])
    buf = io.BytesIO()
    np.savez(buf, **{**dict(np.load(io.BytesIO(data))), "format_version": np.int64(99)})
    with pytest.raises(ValueError, match="format version 99"):
        shards.clip_from_bytes(buf.getvalue())


def test_shards_and_manifest_round_trip(tmp_path, clips):
    out = str(tmp_path / "ds")
    writer = shards.ShardWriter(out, clips_per_shard=2)
    for c in clips:
        writer.add(c)
    manifest = writer.close({"note": "test"})
    assert [s["num_records"] for s in manifest["shards"]] == [2, 1]
    assert manifest["num_clips"] == 3 and manifest["note"] == "test"
    on_disk = json.load(open(os.path.join(out, "manifest.json")))
    assert on_disk["motion_fields"][0] == "mouth_open" and on_disk["resolution"] == 64
    assert on_disk["renderer_version"] == rnd.RENDERER_VERSION == 2   # data sets say how drawn
    assert on_disk["clips"][1]["language"] == "zh"
    ds = shards.AvatarWorldDataset(out)
    assert len(ds) == 3
    for a, b in zip(ds, clips):
        _same(a, b)
    _same(ds[-1], clips[2])
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(FileExistsError, match="already holds"):
        shards.ShardWriter(out)
    writer = shards.ShardWriter(str(tmp_path / "other"))
    writer.add(clips[0])
    with pytest.raises(ValueError, match="one resolution"):
        writer.add(make_clip(0, 0, 0, num_frames=1, resolution=96))
    writer.close()


def test_dataset_refuses_broken_directories(tmp_path, clips):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        shards.AvatarWorldDataset(str(tmp_path))
    out = str(tmp_path / "ds")
    w = shards.ShardWriter(out)
    w.add(clips[0])
    w.close()
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    manifest["shards"][0]["num_records"] = 5
    json.dump(manifest, open(os.path.join(out, "manifest.json"), "w"))
    with pytest.raises(ValueError, match="holds 1 records, the manifest says 5"):
        shards.AvatarWorldDataset(out)
    os.remove(os.path.join(out, manifest["shards"][0]["path"]))
    with pytest.raises(FileNotFoundError, match="missing"):
        shards.AvatarWorldDataset(out)


def _decode_png(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        chunks[kind] = chunks.get(kind, b"") + data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(
            kind + data[pos + 8:pos + 8 + n])
        pos += 12 + n
    w, h = struct.unpack(">II", chunks[b"IHDR"][:8])
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, 3)


def test_png_and_contact_sheet(tmp_path, clips):
    sheet = cli.sheet_from_clips(clips, cols=4)
    assert sheet.shape == (3 * 66 + 2, 4 * 66 + 2, 3)
    path = str(tmp_path / "s.png")
    media.write_png(path, sheet)
    assert np.array_equal(_decode_png(open(path, "rb").read()), sheet)
    assert np.array_equal(sheet[2:66, 2:66], clips[0].frames[0])
    with pytest.raises(ValueError, match="uint8"):
        media.encode_png(np.zeros((4, 4, 3), np.float32))


def test_mp4_has_video_and_sound(tmp_path, clips):
    av = pytest.importorskip("av")
    clip = make_clip(1, 2, 3, num_frames=25, resolution=64)
    path = str(tmp_path / "c.mp4")
    media.write_mp4(path, clip.frames, clip.audio)
    assert not [f for f in os.listdir(tmp_path) if "partial" in f]
    with av.open(path) as f:
        assert f.streams.video[0].codec_context.name == "h264"
        assert f.streams.audio[0].codec_context.name == "aac"
        assert f.streams.audio[0].rate == 16000
        video = np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])
    assert video.shape == clip.frames.shape
    assert np.abs(video.astype(int) - clip.frames).mean() < 8
    with av.open(path) as f:
        audio = np.concatenate([fr.to_ndarray()[0] for fr in f.decode(audio=0)])
    assert audio.size >= clip.audio.size and np.abs(audio).max() > 0.1
    with pytest.raises(ValueError, match="even sizes"):
        media.write_mp4(path, np.zeros((2, 63, 64, 3), np.uint8))


def test_cli_writes_a_data_set_atomically(tmp_path, capsys):
    out = str(tmp_path / "ds")
    rc = cli.main(["write", out, "--clips", "3", "--resolution", "64", "--frames", "5",
                   "--clips-per-shard", "2", "--mp4", "1", "--contact-sheet",
                   "--languages", "de,fr"])
    assert rc == 0
    assert sorted(os.listdir(out)) == ["avatarworld-00000.array_record",
                                       "avatarworld-00001.array_record", "contact_sheet.png",
                                       "manifest.json", "preview"]
    ds = shards.AvatarWorldDataset(out)
    assert len(ds) == 3 and {c.language for c in ds} <= {"de", "fr"}
    assert ds.manifest["frames_per_clip"] == 5
    # same arguments: the same data
    again = str(tmp_path / "again")
    cli.main(["write", again, "--clips", "3", "--resolution", "64", "--frames", "5",
              "--languages", "de,fr"])
    for a, b in zip(ds, shards.AvatarWorldDataset(again)):
        _same(a, b)
    capsys.readouterr()
    assert cli.main(["write", out, "--clips", "1"]) == 1
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert cli.main(["inspect", out]) == 0
    assert json.loads(capsys.readouterr().out)["clips"] == 3


def test_cli_leaves_nothing_behind_on_failure(tmp_path, monkeypatch):
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("renderer crashed")
        return make_clip(0, 0, 0, num_frames=2, resolution=64)

    monkeypatch.setattr(cli, "make_clip", failing)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        cli.main(["write", str(tmp_path / "ds"), "--clips", "3", "--resolution", "64"])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv", [["write", "x", "--resolution", "48"],
                                  ["write", "x", "--languages", "en,xx"],
                                  ["write", "x", "--clips", "0"],
                                  ["preview", "x.mp4", "--language", "klingon"]])
def test_cli_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2


def test_cli_preview_and_sheet(tmp_path, capsys):
    assert cli.main(["preview", str(tmp_path / "p.avi")]) == 1
    assert "must end in .mp4" in capsys.readouterr().err
    assert cli.main(["preview", str(tmp_path / "p.mp4"), "--seconds", "0.4", "--resolution",
                     "64", "--identity", "7"]) == 0
    assert "(heldout)" in capsys.readouterr().out
    assert os.path.getsize(tmp_path / "p.mp4") > 1000
    assert cli.main(["sheet", str(tmp_path / "s.png"), "--rows", "2", "--cols", "3",
                     "--resolution", "64"]) == 0
    img = _decode_png(open(tmp_path / "s.png", "rb").read())
    assert img.shape == (2 * 66 + 2, 3 * 66 + 2, 3)

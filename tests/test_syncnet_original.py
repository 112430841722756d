"""The original SyncNet: PyTorch parity of the imported weights, the importer's errors, the
original front end (MFCC against python_speech_features, window counts, face crops) and the
LSE offset search end to end."""

from __future__ import annotations

import numpy as np
import pytest

from avatarv_jax.eval import lse
from avatarv_jax.eval import syncnet_original as so


def _torch_syncnet():
    """The original architecture in PyTorch, written from the published layer table: same
    structure, same state-dict names."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    def fc():
        return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(),
                             nn.Linear(512, 1024))

    class Original(nn.Module):
        def __init__(self):
            super().__init__()
            self.netcnnaud = nn.Sequential(
                nn.Conv2d(1, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(1, 1),
                nn.Conv2d(64, 192, 3, 1, 1), nn.BatchNorm2d(192), nn.ReLU(),
                nn.MaxPool2d(3, (1, 2)),
                nn.Conv2d(192, 384, 3, 1, 1), nn.BatchNorm2d(384), nn.ReLU(),
                nn.Conv2d(384, 256, 3, 1, 1), nn.BatchNorm2d(256), nn.ReLU(),
                nn.Conv2d(256, 256, 3, 1, 1), nn.BatchNorm2d(256), nn.ReLU(),
                nn.MaxPool2d(3, 2),
                nn.Conv2d(256, 512, (5, 4)), nn.BatchNorm2d(512), nn.ReLU())
            self.netfcaud = fc()
            self.netfclip = fc()
            self.netcnnlip = nn.Sequential(
                nn.Conv3d(3, 96, (5, 7, 7), (1, 2, 2)), nn.BatchNorm3d(96), nn.ReLU(),
                nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
                nn.Conv3d(96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), nn.BatchNorm3d(256),
                nn.ReLU(), nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1)),
                nn.Conv3d(256, 256, (1, 3, 3), 1, (0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(),
                nn.Conv3d(256, 256, (1, 3, 3), 1, (0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(),
                nn.Conv3d(256, 256, (1, 3, 3), 1, (0, 1, 1)), nn.BatchNorm3d(256), nn.ReLU(),
                nn.MaxPool3d((1, 3, 3), (1, 2, 2)),
                nn.Conv3d(256, 512, (1, 6, 6)), nn.BatchNorm3d(512), nn.ReLU())

        def forward_aud(self, x):
            h = self.netcnnaud(x)
            return self.netfcaud(h.view(h.shape[0], -1))

        def forward_lip(self, x):
            h = self.netcnnlip(x)
            return self.netfclip(h.view(h.shape[0], -1))

    torch.manual_seed(0)
    net = Original()
    with torch.no_grad():  # batch norms that are far from identity
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return torch, net.eval()


@pytest.fixture(scope="module")
def torch_weights(tmp_path_factory):
    """(torch, the PyTorch net, its state dict saved as safetensors) -- as a user converts it."""
    torch, net = _torch_syncnet()
    from safetensors.torch import save_file

    path = str(tmp_path_factory.mktemp("syncnet") / "syncnet_v2.safetensors")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
    return torch, net, path


def _numpy_state(path):
    from avatarv_jax.io.small_weights import read_weights

    return read_weights(path)[0]


def test_expected_names_match_the_pytorch_state_dict(torch_weights):
    _, net, _ = torch_weights
    torch_shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()
                    if not k.endswith("num_batches_tracked")}
    assert torch_shapes == so.expected_tensors()


def test_imported_weights_match_pytorch(torch_weights):
    torch, net, path = torch_weights
    model = so.load_original_syncnet(path)
    rng = np.random.default_rng(0)
    frames = rng.uniform(0, 255, (2, 5, 224, 224, 3)).astype(np.float32)  # [N, T, H, W, C]
    mfcc = rng.normal(0, 10, (2, 13, 20, 1)).astype(np.float32)
    with torch.no_grad():
        ref_v = net.forward_lip(torch.from_numpy(frames.transpose(0, 4, 1, 2, 3).copy())).numpy()
        ref_a = net.forward_aud(torch.from_numpy(mfcc.transpose(0, 3, 1, 2).copy())).numpy()
    v, a = np.asarray(model.video(frames)), np.asarray(model.audio(mfcc))
    assert v.shape == a.shape == (2, 1024)
    for ours, ref in ((v, ref_v), (a, ref_a)):
        assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(ours - ref).max()
    # the two samples differ, so a broadcast or batch mix-up would show
    assert np.abs(ref_v[0] - ref_v[1]).max() > 1e-2 * np.abs(ref_v).max()


def _save(path, tensors):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return str(path)


def test_missing_tensor_is_named(torch_weights, tmp_path):
    t = _numpy_state(torch_weights[2])
    del t["netcnnlip.5.running_var"]
    with pytest.raises(ValueError, match=r"netcnnlip\.5\.running_var is missing"):
        so.load_original_syncnet(_save(tmp_path / "m.safetensors", t))


def test_wrong_shape_is_named(torch_weights, tmp_path):
    t = _numpy_state(torch_weights[2])
    t["netfcaud.3.weight"] = t["netfcaud.3.weight"][:512]
    with pytest.raises(ValueError, match=r"netfcaud\.3\.weight has shape \(512, 512\), "
                                         r"expected \(1024, 512\)"):
        so.load_original_syncnet(_save(tmp_path / "s.safetensors", t))


def test_unexpected_tensor_is_named(torch_weights, tmp_path):
    t = _numpy_state(torch_weights[2])
    t["module.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"unexpected tensor module\.extra\.weight"):
        so.load_original_syncnet(_save(tmp_path / "x.safetensors", t))


def test_pickle_file_is_refused_without_loading(tmp_path):
    path = tmp_path / "syncnet_v2.model"
    path.write_bytes(b"\x80\x04\x95 not a safetensors header")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        so.load_original_syncnet(str(path))
    with pytest.raises(FileNotFoundError, match="not found"):
        so.load_original_syncnet(str(tmp_path / "absent.safetensors"))


def test_mfcc_matches_python_speech_features():
    psf = pytest.importorskip("python_speech_features")
    rng = np.random.default_rng(1)
    t = np.arange(16000 + 123) / 16000
    audio = (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.normal(size=t.size)).astype(np.float32)
    audio[4000:6000] = 0  # silence: the log floors
    pcm = so.to_int16_units(audio)
    ref = psf.mfcc(pcm, 16000)
    ours = so.original_mfcc(pcm)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)


def test_mfcc_known_values():
    """Without python_speech_features: a DC-free constant-zero signal has log-eps energies, and
    frame counts follow 1 + ceil((N - 400) / 160)."""
    for n, frames in ((400, 1), (401, 2), (640 * 10, 39)):
        assert so.original_mfcc(np.ones(n)).shape == (frames, 13)
    m = so.original_mfcc(np.zeros(1000))
    eps = np.log(np.finfo(np.float64).eps)
    np.testing.assert_allclose(m[:, 0], eps, rtol=1e-6)          # c0 := log energy
    np.testing.assert_allclose(m[:, 1:], 0, atol=1e-3)            # flat log spectrum
    with pytest.raises(ValueError, match="mono"):
        so.original_mfcc(np.zeros((2, 100)))


def test_windows_shapes_and_layout():
    rng = np.random.default_rng(2)
    faces = rng.integers(0, 256, (12, 224, 224, 3), dtype=np.uint8)
    audio = rng.normal(0, 0.1, 640 * 11 + 100).astype(np.float32)   # 11 frames of audio
    v, a = so.original_windows(faces, audio)
    assert v.shape == (6, 5, 224, 224, 3) and a.shape == (6, 13, 20, 1)   # min(12, 11) - 5
    np.testing.assert_array_equal(v[2, 1], faces[3, ..., ::-1].astype(np.float32))  # BGR, 0-255
    mf = so.original_mfcc(so.to_int16_units(audio))
    np.testing.assert_array_equal(a[3, :, :, 0], mf[12:32].T)      # columns 4t .. 4t+19
    small = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)     # resized to 224
    v2, _ = so.original_windows(small, audio)
    assert v2.shape == (2, 5, 224, 224, 3) and 0 <= v2.min() and v2.max() <= 255
    with pytest.raises(ValueError, match="no window"):
        so.original_windows(faces[:5], audio)


def test_crop_faces_geometry():
    frames = np.zeros((2, 100, 120, 3), np.uint8)
    frames[:, 40:60, 50:70] = 255                      # the "face": a white 20 px square
    crops = so.crop_faces(frames, np.array([50, 40, 70, 60]))
    assert crops.shape == (2, 224, 224, 3) and crops.dtype == np.uint8
    # s = 10: the crop is 28 px wide centred on x = 60, rows 40 .. 58 relative to y = 50 - 10;
    # the face fills x 4..24 of 28 and y 0..20 of 28 -> 224 * (4/28, 24/28), 224 * (0, 20/28)
    white = crops[0, :, :, 0] > 128
    ys, xs = np.nonzero(white)
    assert abs(xs.min() - 32) <= 2 and abs(xs.max() + 1 - 192) <= 2
    assert ys.min() == 0 and abs(ys.max() + 1 - 160) <= 2
    corner = so.crop_faces(frames, np.array([0, 0, 20, 20]))   # padded with grey 110
    assert corner[0, 0, 0, 0] == so.CROP_PAD_VALUE
    with pytest.raises(ValueError, match="box"):
        so.crop_faces(frames, np.zeros((3, 4)))


def test_lse_offset_search_end_to_end(torch_weights):
    scorer = so.OriginalSyncScorer(so.load_original_syncnet(torch_weights[2]), batch=4)
    rng = np.random.default_rng(4)
    frames = rng.integers(0, 256, (14, 48, 64, 3), dtype=np.uint8)
    audio = rng.normal(0, 0.1, 14 * 640).astype(np.float32)
    score = lse.clip_sync(scorer, frames, audio, np.array([20.0, 10.0, 44.0, 34.0]))
    assert score.distances.shape == (2 * lse.MAX_OFFSET + 1,)
    assert np.isfinite(score.distances).all() and score.lse_c >= 0
    assert -lse.MAX_OFFSET <= score.offset <= lse.MAX_OFFSET
    assert set(score.as_dict()) == {"lse_d", "lse_c", "sync_offset"}
    # the chain is the documented pieces: crop, windows, embeddings, zero-padded search
    v, a = scorer.embed(so.crop_faces(frames, np.array([20.0, 10.0, 44.0, 34.0])), audio)
    assert v.shape == a.shape == (9, 1024)
    ref = lse.sync_score(v, a, padding="zeros")
    np.testing.assert_allclose(score.distances, ref.distances, rtol=1e-6)


@pytest.mark.parametrize("n", [9, 40])
def test_zero_padding_matches_the_original_distance_table(n):
    """syncnet_python pads the audio embeddings with max_offset zero vectors on each side and
    averages |v_i - a_{i+k}| over all i; short clips (n <= max_offset) included."""
    rng = np.random.default_rng(n)
    v, a = rng.normal(size=(n, 8)), rng.normal(size=(n, 8))
    m = lse.MAX_OFFSET
    padded = np.concatenate([np.zeros((m, 8)), a, np.zeros((m, 8))])
    ref = [np.mean([np.linalg.norm(v[i] - padded[i + k + m]) for i in range(n)])
           for k in range(-m, m + 1)]
    np.testing.assert_allclose(lse.offset_distances(v, a, m, "zeros"), ref, rtol=1e-12)


def test_cli_refuses_bad_original_weights(tmp_path, capsys, torch_weights):
    from avatarv_jax.eval.__main__ import main

    base = [str(tmp_path / "gen"), "--references", str(tmp_path / "ref"),
            "--out", str(tmp_path / "out")]
    absent = str(tmp_path / "absent.safetensors")
    assert main(base + ["--syncnet-original", absent]) == 2
    assert f"--syncnet-original: original SyncNet weights not found at {absent}" in \
        capsys.readouterr().err
    bad = tmp_path / "syncnet_v2.model"
    bad.write_bytes(b"\x80\x04 pickle bytes")
    assert main(base + ["--syncnet-original", str(bad)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err
    t = _numpy_state(torch_weights[2])
    del t["netfclip.0.bias"]
    wrong = _save(tmp_path / "wrong.safetensors", t)
    assert main(base + ["--syncnet-original", wrong]) == 2
    assert "netfclip.0.bias is missing" in capsys.readouterr().err
    assert main(base + ["--syncnet-original", torch_weights[2], "--syncnet", "x"]) == 2
    assert "not both" in capsys.readouterr().err
    aw = ["--avatarworld", "2", "--out", str(tmp_path / "aw"), "--syncnet-original", wrong]
    assert main(aw) == 2
    assert "real videos" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "aw").exists()


def test_cli_real_video_mode_with_original_weights(tmp_path, torch_weights):
    """GEN_DIR against REF_DIR scored with imported (random) original weights: face boxes from
    dlib, 224 px face crops, the zero-padded offset search; every clip gets finite LSE."""
    import json

    from avatarv_jax.data.ingest.faces import faces_available

    if not faces_available():
        pytest.skip("needs the `faces` extra (dlib)")

    from avatarv_jax.eval.__main__ import main as eval_main
    from avatarv_jax.testing import write_astronaut_videos

    gen, ref = write_astronaut_videos(tmp_path, 160, 7)
    out = tmp_path / "report"
    assert eval_main([str(gen), "--references", str(ref), "--out", str(out),
                      "--syncnet-original", torch_weights[2]]) == 0
    with open(out / "report.json") as f:
        rep = json.load(f)
    assert rep["meta"]["syncnet"] == f"original:{torch_weights[2]}"
    for rows in rep["per_clip"].values():
        for r in rows:
            assert np.isfinite(r["lse_d"]) and np.isfinite(r["lse_c"]), r
            assert -15 <= r["sync_offset"] <= 15

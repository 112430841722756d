"""The cross-clip identity graph: descriptor, nearest-neighbour indices, edges, AvatarWorld truth."""

import numpy as np
import pytest

from avatarv_jax.data import identity_graph as ig
from avatarv_jax.data.avatarworld import ShardWriter, make_clip


def test_background_descriptor_ignores_the_face_and_tells_scenes_apart():
    a = make_clip(0, identity_id=3, scene_id=10, num_frames=3, resolution=64,
                  speech_backend="synthetic")
    b = make_clip(1, identity_id=3, scene_id=11, num_frames=3, resolution=64,
                  speech_backend="synthetic")
    da = ig.background_descriptor(a.frames, a.masks["face"])
    assert da.shape == (3 * 16 + 64,) and da.dtype == np.float32
    assert abs(np.linalg.norm(da) - 1) < 1e-6
    repainted = a.frames.copy()
    repainted[a.masks["face"]] = 255 - repainted[a.masks["face"]]
    np.testing.assert_allclose(ig.background_descriptor(repainted, a.masks["face"]), da, atol=1e-7)
    db = ig.background_descriptor(b.frames, b.masks["face"])
    assert float(da @ db) < 0.98
    with pytest.raises(ValueError, match="face_mask must be"):
        ig.background_descriptor(a.frames, a.masks["face"][:, :10])
    with pytest.raises(ValueError, match="uint8"):
        ig.background_descriptor(a.frames.astype(np.float32), a.masks["face"])


def clustered(n_clusters=60, per=5, dim=32, noise=0.15, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    x = np.repeat(centres, per, 0) + noise * rng.normal(size=(n_clusters * per, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), \
        np.repeat(np.arange(n_clusters), per)


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_approximate_indices_find_the_exact_neighbours(index):
    if index == "hnsw" and not ig.faiss_available():
        pytest.skip("faiss-cpu is not installed")
    x, _ = clustered()
    exact_ids, _ = ig.knn_exact(x, 6)
    brute = np.argsort(-(x @ x.T), axis=1)[:, :6]
    np.testing.assert_array_equal(np.sort(exact_ids, 1), np.sort(brute, 1))
    ids, sims, used = ig.nearest_neighbours(x, 6, index)
    assert used == index and ids.shape == (300, 6)
    recall = np.mean([len(set(a) & set(b)) / 6 for a, b in zip(ids, exact_ids)])
    assert recall >= 0.95
    found = ids >= 0
    np.testing.assert_allclose(sims[found], np.einsum("nd,nkd->nk", x, x[np.maximum(ids, 0)])[found],
                               atol=1e-5)


def test_graph_edges_obey_every_rule():
    face, person = clustered(n_clusters=20, per=4)
    rng = np.random.default_rng(1)
    scene = rng.integers(0, 6, size=80)                  # scenes repeat: some pairs share one
    scene_vecs = rng.normal(size=(6, 16))
    background = scene_vecs[scene] + 0.01 * rng.normal(size=(80, 16))
    frames = np.where(np.arange(80) % 9 == 0, 5, 20)     # every 9th clip is too short
    g = ig.build_identity_graph(face, background, frames, face_threshold=0.8,
                                background_threshold=0.9, min_frames=9, k=8, index="exact")
    i, j = g.edges.T
    assert (i < j).all() and len(g.edges) > 0
    assert (person[i] == person[j]).all() and (scene[i] != scene[j]).all()
    assert (frames[i] >= 9).all() and (frames[j] >= 9).all()
    assert (g.face_similarity >= 0.8).all() and (g.background_similarity <= 0.9).all()
    assert (g.components[frames < 9] == -1).all()
    m = ig.evaluate_against_truth(g, person, scene, frames, 9)
    assert m["precision"] == 1.0 and m["edge_recall"] == 1.0 and m["component_purity"] == 1.0
    pairs = g.directed_pairs()
    assert pairs.shape == (2 * len(g.edges), 2) and set(map(tuple, pairs[len(g.edges):])) == \
        {(b, a) for a, b in g.edges}


def test_graph_save_load_round_trip_and_bad_input(tmp_path):
    face, _ = clustered(n_clusters=5, per=3)
    g = ig.build_identity_graph(face, np.eye(15, dtype=np.float32), np.full(15, 10),
                                face_threshold=0.8, background_threshold=0.5, min_frames=1)
    g.save(str(tmp_path / "g.npz"))
    h = ig.IdentityGraph.load(str(tmp_path / "g.npz"))
    np.testing.assert_array_equal(h.edges, g.edges)
    np.testing.assert_array_equal(h.components, g.components)
    assert h.params == g.params and h.num_components == g.num_components == 5
    with pytest.raises(ValueError, match="one N"):
        ig.build_identity_graph(face, np.eye(14), np.full(15, 10), face_threshold=0.8,
                                background_threshold=0.5, min_frames=1)
    with pytest.raises(ValueError, match="unknown index"):
        ig.nearest_neighbours(face, 3, "kdtree")


def test_avatarworld_pairs_are_the_same_person_in_other_scenes(tmp_path):
    """Precision >= 0.99 and edge recall >= 0.95 against AvatarWorld's ground truth.

    24 people x 4 clips of 13 frames; each person's fourth clip reuses their first scene, so
    there are same-person same-scene pairs the background rule must reject.
    """
    writer = ShardWriter(str(tmp_path / "aw"), clips_per_shard=32)
    rng = np.random.default_rng(0)
    k = 0
    for person in range(24):
        scenes = rng.choice(500, size=4, replace=False)
        scenes[3] = scenes[0]
        for scene in scenes:
            writer.add(make_clip(k, identity_id=3 * person + 1, scene_id=int(scene),
                                 num_frames=13, resolution=64, speech_backend="synthetic"))
            k += 1
    writer.close()
    f = ig.avatarworld_features(str(tmp_path / "aw"), frames_per_clip=9)
    g = ig.build_identity_graph(f["face_embedding"], f["background"], f["num_frames"],
                                face_threshold=0.82, background_threshold=0.985, min_frames=9)
    m = ig.evaluate_against_truth(g, f["identity_id"], f["scene_id"], f["num_frames"], 9)
    assert m["true_pairs"] == 24 * 5
    assert m["precision"] >= 0.99, m
    assert m["edge_recall"] >= 0.95, m
    assert m["component_recall"] >= 0.95 and m["component_purity"] >= 0.99, m
    same_scene = f["scene_id"][g.edges[:, 0]] == f["scene_id"][g.edges[:, 1]]
    assert not same_scene.any()

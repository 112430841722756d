"""The cross-clip identity graph: which clips show the same person in a different scene.

Personality SFT (DESIGN §5, stage 3) trains on (reference, target) pairs of one person in two
*different* clips, so that the model learns the person rather than copying the reference's
scene. Nodes are clips; an edge joins clips ``i`` and ``j`` when

* their face embeddings agree: ``cos(face_i, face_j) >= face_threshold``,
* their backgrounds differ: ``cos(background_i, background_j) <= background_threshold``,
* both are long enough: ``num_frames >= min_frames``.

Connected components are identities. Candidate pairs come from a k-nearest-neighbour index over
the face embeddings, never from all pairs:

=============  =====================================================  ==========================
index          build                                                  query (all N clips)
=============  =====================================================  ==========================
``hnsw``       faiss HNSW graph: O(N log N · M · d)                   O(N log N · ef · d)
``ivf``        numpy k-means into ``nlist = ~4√N`` lists: O(N √N d)  O(N · nprobe · N/nlist · d)
``exact``      none                                                   O(N² d), blocks of 4096
=============  =====================================================  ==========================

``auto`` picks ``hnsw`` when ``faiss`` (faiss-cpu) is installed, else ``ivf`` (written here,
no dependency), and ``exact`` below 2048 clips where brute force is fastest. Filtering the
``k`` candidates per clip and the union-find over at most ``N k`` edges are linear, so the whole
build is O(N log N) with HNSW. Each clip keeps at most ``k`` edges: enough to connect an
identity (the components) and to give SFT many pairs; a person with more than ``k`` clips has
only some of their pairs as edges, which is why recall is reported for edges *and* components.

``background_descriptor`` turns the pixels outside the face into the background vector; the
face embedding is the AvatarWorld probe's identity embedding on AvatarWorld
(``avatarworld_features``) and the dlib 128-d embedding on real video (stored in the ingestion
manifest).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from typing import Any

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph

GRAPH_VERSION = 1
EXACT_BELOW = 2048
_EXACT_BLOCK = 4096


# ---- background descriptor -------------------------------------------------------------------

def background_descriptor(frames: np.ndarray, face_mask: np.ndarray, *, grid: int = 4,
                          bins: int = 4) -> np.ndarray:
    """float32 [3 grid² + bins³], unit norm: what the clip looks like outside the face.

    Two parts, weighted equally: the mean colour of the non-face pixels in each cell of a
    ``grid x grid`` layout (centred on grey, so that different colours point in different
    directions), and the square root of the joint RGB histogram (``bins`` per channel) of the
    non-face pixels (the Hellinger embedding, whose dot product is the Bhattacharyya
    coefficient). Cells with no background pixel contribute zero.
    """
    frames = np.asarray(frames)
    face_mask = np.asarray(face_mask, bool)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if face_mask.shape != frames.shape[:3]:
        raise ValueError(f"face_mask must be [T, H, W] = {frames.shape[:3]}, got {face_mask.shape}")
    h, w = frames.shape[1:3]
    if h < grid or w < grid:
        raise ValueError(f"frames of {h}x{w} are smaller than the {grid}x{grid} grid")
    keep = ~face_mask
    x = frames.astype(np.float32) / 255.0
    rows = np.minimum(np.arange(h) * grid // h, grid - 1)
    cols = np.minimum(np.arange(w) * grid // w, grid - 1)
    cell = (rows[:, None] * grid + cols[None, :])                      # [H, W]
    cell = np.broadcast_to(cell, keep.shape)[keep]
    pixels = x[keep]                                                   # [P, 3]
    counts = np.bincount(cell, minlength=grid * grid).astype(np.float32)
    sums = np.stack([np.bincount(cell, pixels[:, c], minlength=grid * grid) for c in range(3)], -1)
    layout = np.where(counts[:, None] > 0, sums / np.maximum(counts[:, None], 1) - 0.5, 0.0)
    q = np.minimum((pixels * bins).astype(np.int64), bins - 1)
    hist = np.bincount((q[:, 0] * bins + q[:, 1]) * bins + q[:, 2], minlength=bins ** 3)
    hist = np.sqrt(hist / max(1, hist.sum()))
    layout = layout.reshape(-1)
    parts = [layout / max(np.linalg.norm(layout), 1e-8), hist / max(np.linalg.norm(hist), 1e-8)]
    out = np.concatenate(parts).astype(np.float32)
    return out / max(float(np.linalg.norm(out)), 1e-8)


# ---- nearest-neighbour indices ----------------------------------------------------------------

def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)


def _top_k(sims: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` columns per row of ``sims`` (ids of -1 mark padding), sorted descending."""
    if sims.shape[1] > k:
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        sims = np.take_along_axis(sims, part, 1)
        ids = np.take_along_axis(ids, part, 1)
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(sims, order, 1)


def knn_exact(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product neighbours in blocks: O(N² d) time, O(block · N) memory."""
    n = x.shape[0]
    k = min(k, n)
    ids, sims = [], []
    for s in range(0, n, _EXACT_BLOCK):
        block = x[s:s + _EXACT_BLOCK] @ x.T
        i, v = _top_k(block, np.broadcast_to(np.arange(n), block.shape), k)
        ids.append(i)
        sims.append(v)
    return np.concatenate(ids).astype(np.int64), np.concatenate(sims).astype(np.float32)


def _inverted(keys: np.ndarray, num_keys: int, values: np.ndarray | None = None):
    """``lookup(c)``: the values (default: positions) whose key is ``c``, by one sort."""
    values = np.arange(keys.size) if values is None else values
    order = np.argsort(keys, kind="stable")
    offsets = np.searchsorted(keys[order], np.arange(num_keys + 1))
    return lambda c: values[order[offsets[c]:offsets[c + 1]]]


def knn_ivf(x: np.ndarray, k: int, *, nlist: int | None = None, nprobe: int = 8,
            iterations: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inverted-file index in numpy: spherical k-means lists, each query scans ``nprobe`` lists.

    Approximate (a neighbour in an unvisited list is missed); with ``nlist ~ 4√N`` and
    ``nprobe = 8`` each query scans about ``2√N`` vectors.
    """
    n = x.shape[0]
    nlist = int(nlist or max(1, min(n, round(4 * np.sqrt(n)))))
    nprobe = min(nprobe, nlist)
    rng = np.random.default_rng(seed)
    sample = x[rng.choice(n, size=min(n, 256 * nlist), replace=False)]
    centroids = sample[rng.choice(sample.shape[0], size=nlist, replace=False)]
    for _ in range(iterations):                       # spherical k-means on a sample
        assign = np.argmax(sample @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, sample)
        empty = np.linalg.norm(sums, axis=1) == 0
        sums[empty] = sample[rng.choice(sample.shape[0], size=int(empty.sum()))]
        centroids = _normalise(sums)
    assign = np.argmax(x @ centroids.T, axis=1)
    probes = np.argsort(-(x @ centroids.T), axis=1)[:, :nprobe]      # [N, nprobe] lists
    k = min(k, n)
    ids = np.full((n, k), -1, np.int64)
    sims = np.full((n, k), -np.inf, np.float32)
    members_of = _inverted(assign, nlist)
    queries_of = _inverted(probes.reshape(-1), nlist, np.repeat(np.arange(n), nprobe))
    for c in range(nlist):                            # one list at a time: merge into the top k
        members, queries = members_of(c), queries_of(c)
        if members.size == 0 or queries.size == 0:
            continue
        s = x[queries] @ x[members].T
        all_ids = np.concatenate([ids[queries], np.broadcast_to(members, s.shape)], 1)
        all_sims = np.concatenate([sims[queries], s], 1)
        ids[queries], sims[queries] = _top_k(all_sims, all_ids, k)
    return ids, sims


def knn_hnsw(x: np.ndarray, k: int, *, m: int = 32, ef: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """faiss HNSW over inner products (``pip install faiss-cpu``)."""
    import faiss

    n, d = x.shape
    k = min(k, n)
    index = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = max(40, 2 * m)
    index.add(np.ascontiguousarray(x, np.float32))
    index.hnsw.efSearch = int(ef or max(64, 2 * k))
    sims, ids = index.search(np.ascontiguousarray(x, np.float32), k)
    return ids.astype(np.int64), sims.astype(np.float32)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def nearest_neighbours(x: np.ndarray, k: int, index: str = "auto", *, seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray, str]:
    """(ids [N, k], cosine [N, k], index used) of the unit rows of ``x``; ids -1 = none found."""
    if index == "auto":
        index = "exact" if x.shape[0] < EXACT_BELOW else ("hnsw" if faiss_available() else "ivf")
    if index == "exact":
        return (*knn_exact(x, k), index)
    if index == "ivf":
        return (*knn_ivf(x, k, seed=seed), index)
    if index == "hnsw":
        if not faiss_available():
            raise ImportError("index 'hnsw' needs faiss (pip install faiss-cpu); "
                              "use index='ivf' for the built-in index")
        return (*knn_hnsw(x, k), index)
    raise ValueError(f"unknown index {index!r}; use auto, exact, ivf or hnsw")


# ---- the graph -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class IdentityGraph:
    """Undirected edges (``i < j``) between clips, and the identity components."""

    num_nodes: int
    edges: np.ndarray                  # int64 [E, 2], i < j, sorted
    face_similarity: np.ndarray        # float32 [E]
    background_similarity: np.ndarray  # float32 [E]
    components: np.ndarray             # int64 [N]: component label; -1 for ineligible clips
    params: dict[str, Any]             # thresholds, k, index: how the graph was built

    @property
    def num_components(self) -> int:
        """Components with at least one edge (identities that can give SFT pairs)."""
        if not len(self.edges):
            return 0
        return int(np.unique(self.components[self.edges[:, 0]]).size)

    def directed_pairs(self) -> np.ndarray:
        """int64 [2E, 2] (target, reference): every edge in both directions."""
        return np.concatenate([self.edges, self.edges[:, ::-1]]).astype(np.int64)

    def save(self, path: str) -> None:
        """npz (no pickle), written through a temporary name."""
        buf = io.BytesIO()
        np.savez(buf, version=np.int64(GRAPH_VERSION), num_nodes=np.int64(self.num_nodes),
                 edges=self.edges, face_similarity=self.face_similarity,
                 background_similarity=self.background_similarity, components=self.components,
                 params=np.array(json.dumps(self.params, sort_keys=True)))
        tmp = f"{path}.partial-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> IdentityGraph:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != GRAPH_VERSION:
                raise ValueError(f"{path}: identity graph version {int(z['version'])} is not "
                                 f"{GRAPH_VERSION}; rebuild it")
            return cls(num_nodes=int(z["num_nodes"]), edges=z["edges"],
                       face_similarity=z["face_similarity"],
                       background_similarity=z["background_similarity"],
                       components=z["components"], params=json.loads(str(z["params"])))


def build_identity_graph(face_emb: np.ndarray, background: np.ndarray, num_frames: np.ndarray, *,
                         face_threshold: float, background_threshold: float, min_frames: int,
                         k: int = 32, index: str = "auto", seed: int = 0) -> IdentityGraph:
    """The graph of the module docstring from per-clip features (rows are clips).

    ``face_emb`` [N, E] and ``background`` [N, K] are L2-normalised here (cosine similarity);
    ``num_frames`` [N]. ``k`` neighbours per clip are searched by face embedding among the
    eligible clips.
    """
    face_emb = np.asarray(face_emb, np.float32)
    background = np.asarray(background, np.float32)
    num_frames = np.asarray(num_frames)
    n = face_emb.shape[0] if face_emb.ndim == 2 else -1
    if face_emb.ndim != 2 or background.ndim != 2 or num_frames.shape != (n,) \
            or background.shape[0] != n:
        raise ValueError(f"need face_emb [N, E], background [N, K] and num_frames [N] with one N; "
                         f"got {face_emb.shape}, {background.shape}, {num_frames.shape}")
    if not (np.isfinite(face_emb).all() and np.isfinite(background).all()):
        raise ValueError("face embeddings and background descriptors must be finite")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    params = dict(face_threshold=float(face_threshold),
                  background_threshold=float(background_threshold), min_frames=int(min_frames),
                  k=int(k), index=index, seed=int(seed))
    eligible = np.flatnonzero(num_frames >= min_frames)
    components = np.full(n, -1, np.int64)
    empty = np.zeros((0, 2), np.int64)
    if eligible.size < 2:
        components[eligible] = np.arange(eligible.size)
        return IdentityGraph(n, empty, np.zeros(0, np.float32), np.zeros(0, np.float32),
                             components, params)
    face = _normalise(face_emb[eligible])
    back = _normalise(background[eligible])
    ids, sims, used = nearest_neighbours(face, k + 1, index, seed=seed)   # +1: the clip itself
    params["index"] = used
    rows = np.repeat(np.arange(eligible.size), ids.shape[1])
    cols, face_sim = ids.reshape(-1), sims.reshape(-1)
    keep = (cols >= 0) & (cols != rows) & (face_sim >= face_threshold)
    rows, cols = rows[keep], cols[keep]
    pairs = np.unique(np.stack([np.minimum(rows, cols), np.maximum(rows, cols)], 1), axis=0)
    face_sim = np.einsum("ed,ed->e", face[pairs[:, 0]], face[pairs[:, 1]])
    back_sim = np.einsum("ed,ed->e", back[pairs[:, 0]], back[pairs[:, 1]])
    keep = back_sim <= background_threshold
    pairs, face_sim, back_sim = pairs[keep], face_sim[keep], back_sim[keep]
    adjacency = scipy.sparse.coo_matrix(
        (np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(eligible.size,) * 2)
    _, labels = scipy.sparse.csgraph.connected_components(adjacency, directed=False)
    components[eligible] = labels
    return IdentityGraph(n, eligible[pairs].astype(np.int64).reshape(-1, 2),
                         face_sim.astype(np.float32), back_sim.astype(np.float32),
                         components, params)


# ---- ground truth ---------------------------------------------------------------------------

def evaluate_against_truth(graph: IdentityGraph, identity_ids: np.ndarray, scene_ids: np.ndarray,
                           num_frames: np.ndarray, min_frames: int) -> dict[str, float]:
    """Precision and recall of the graph's pairs against known identities and scenes.

    A *true pair* is two clips of the same identity in different scenes, both with at least
    ``min_frames`` frames (the pairs the graph is meant to find).

    * ``precision``: the fraction of edges that are true pairs.
    * ``edge_recall``: the fraction of true pairs that are edges.
    * ``component_recall``: the fraction of true pairs whose clips share a component
      (reachable through edges; what matters when identities have more than ``k`` clips).
    * ``component_purity``: the fraction of same-component eligible pairs that share an
      identity (same or different scene).
    """
    identity_ids, scene_ids = np.asarray(identity_ids), np.asarray(scene_ids)
    keep = np.asarray(num_frames) >= min_frames
    comp = graph.components

    def pairs(*keys):                  # eligible pairs agreeing on every key, counted in O(N)
        _, counts = np.unique(np.stack([k[keep] for k in keys], 1), axis=0, return_counts=True)
        return int((counts * (counts - 1) // 2).sum())

    truth = pairs(identity_ids) - pairs(identity_ids, scene_ids)
    joined_truth = pairs(identity_ids, comp) - pairs(identity_ids, comp, scene_ids)
    e = graph.edges
    edge_true = (identity_ids[e[:, 0]] == identity_ids[e[:, 1]]) & \
                (scene_ids[e[:, 0]] != scene_ids[e[:, 1]])
    joined = pairs(comp)
    return {
        "edges": len(e), "true_pairs": truth,
        "precision": float(edge_true.mean()) if len(e) else 1.0,
        "edge_recall": int(edge_true.sum()) / max(1, truth),   # edges are distinct pairs
        "component_recall": joined_truth / truth if truth else 1.0,
        "component_purity": pairs(identity_ids, comp) / joined if joined else 1.0,
    }


# ---- AvatarWorld features ---------------------------------------------------------------------

def evenly_spaced(num_frames: int, count: int) -> np.ndarray:
    """``count`` frame indices spread over a clip (repeating frames of short clips)."""
    return np.linspace(0, num_frames - 1, count).round().astype(np.int64)


def avatarworld_features(directory: str, *, frames_per_clip: int = 9, probe=None
                         ) -> dict[str, np.ndarray]:
    """Per-clip probe identity embedding and background descriptor of an AvatarWorld data set.

    The probe reads ``frames_per_clip`` evenly spaced frames of each clip (one compiled shape
    for every clip). Returns ``face_embedding``, ``background``, ``num_frames`` and the ground
    truth ``identity_id`` and ``scene_id``.
    """
    from avatarv_jax.data.avatarworld.probe import load_probe
    from avatarv_jax.data.avatarworld.shards import AvatarWorldDataset

    probe = probe or load_probe()
    ds = AvatarWorldDataset(directory)
    try:
        out = {k: [] for k in ("face_embedding", "background", "num_frames", "identity_id",
                               "scene_id")}
        for clip in ds:
            sel = evenly_spaced(clip.num_frames, frames_per_clip)
            out["face_embedding"].append(probe.read_clip(clip.frames[sel]).embedding)
            out["background"].append(background_descriptor(clip.frames[sel],
                                                           clip.masks["face"][sel]))
            out["num_frames"].append(clip.num_frames)
            out["identity_id"].append(clip.identity_id)
            out["scene_id"].append(clip.scene_id)
    finally:
        ds.close()
    return {k: np.asarray(v) for k, v in out.items()}


def manifest_features(clips: list[dict[str, Any]]) -> dict[str, np.ndarray] | None:
    """Features stored per clip (a manifest's clip entries) by real-video ingestion or latent
    pre-encoding: ``face_embedding``, ``background``, ``num_frames``; None when absent."""
    if not clips or not all("face_embedding" in c and "background" in c for c in clips):
        return None
    return {"face_embedding": np.asarray([c["face_embedding"] for c in clips], np.float32),
            "background": np.asarray([c["background"] for c in clips], np.float32),
            "num_frames": np.asarray([c["num_frames"] for c in clips], np.int64)}

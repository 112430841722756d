"""Host callbacks in the sharded step: one call per batch shard, also across processes."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avatarv_jax.parallel.host_callback import batch_shard_axes, per_shard_callback


def test_without_a_mesh_it_is_one_plain_callback_without_gradient():
    calls = []

    def host(a, b):
        calls.append(a.shape[0])
        return a.sum(axis=(1, 2)) - b[:, 0]

    a = jnp.arange(24.0).reshape(4, 3, 2)
    b = jnp.ones((4, 5))
    f = jax.jit(lambda a, b: per_shard_callback(host, jnp.float32, a, b))
    np.testing.assert_allclose(f(a, b), np.asarray(a).sum(axis=(1, 2)) - 1.0)
    assert calls == [4] and batch_shard_axes(4) == ()
    grad = jax.grad(lambda a: per_shard_callback(host, jnp.float32, a, b).sum())(a)
    assert not np.any(np.asarray(grad))
    with pytest.raises(ValueError, match="disagree on the batch size"):
        per_shard_callback(host, jnp.float32, a, b[:3])


# Each of two processes owns 2 of the 4 CPU devices of a (data 2, fsdp 2) mesh; 8 samples.
WORKER = r"""
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from avatarv_jax.config import DEFAULT_LOGICAL_AXIS_RULES
from avatarv_jax.parallel.host_callback import per_shard_callback
from avatarv_jax.parallel.sharding import use_rules
from avatarv_jax.posttrain.real_rewards import FaceSimilarityReward

mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 1, 1), ("data", "fsdp", "tensor", "sequence"))
B = 8
frames = np.random.default_rng(0).uniform(-1, 1, (B, 3, 8, 8, 3)).astype(np.float32)
ref = np.random.default_rng(1).uniform(-1, 1, (B, 2, 8, 8, 3)).astype(np.float32)
sharding = NamedSharding(mesh, P(("data", "fsdp")))
put = lambda x: jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

seen = []
def host(x):
    seen.append(np.asarray(x)[:, 1, 0, 0, 0].astype(int).tolist())
    return x.reshape(x.shape[0], -1).sum(1)

class MeanColour:      # stands in for dlib: a 3-d "embedding" of each frame
    def embed(self, f):
        return np.asarray(f, np.float32).mean(axis=(1, 2))

reward = FaceSimilarityReward(embedder=MeanColour(), frames=2)
ids = np.zeros_like(frames)
ids[:, 1, 0, 0, 0] = np.arange(B)          # item i carries its index in one pixel

def step(f, r, tagged):
    with use_rules(mesh, DEFAULT_LOGICAL_AXIS_RULES):
        return per_shard_callback(host, jnp.float32, tagged), reward(f, r)

sums, face = jax.jit(step)(put(frames), put(ref), put(ids))
sums = multihost_utils.process_allgather(sums, tiled=True)
face = multihost_utils.process_allgather(face, tiled=True)
print("RESULT " + json.dumps(dict(pid=pid, seen=seen, sums=np.asarray(sums).tolist(),
                                  face=np.asarray(face).tolist(),
                                  want_face=reward.host(frames, ref).tolist(),
                                  local=[d.id for d in jax.local_devices()])), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_each_score_their_own_samples(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = str(_free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, str(script), str(pid), port], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in (0, 1)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(next(line for line in out.splitlines()
                                       if line.startswith("RESULT "))[len("RESULT "):]))
    want_sums = [float(i) for i in range(8)]
    for r in results:
        np.testing.assert_allclose(r["sums"], want_sums)               # the global result
        np.testing.assert_allclose(r["face"], r["want_face"], rtol=1e-5, atol=1e-6)
        # Two devices per process, two samples per device: two calls of two samples each.
        assert [len(s) for s in r["seen"]] == [2, 2], r["seen"]
    mine = [sorted(i for call in r["seen"] for i in call) for r in results]
    assert sorted(mine[0] + mine[1]) == list(range(8))                 # every sample once...
    assert not set(mine[0]) & set(mine[1])                             # ... on one host only

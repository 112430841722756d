"""The jitted, donated train step over pure parameter trees, sharded by the logical rules.

``TrainStepBuilder`` holds what does not change between steps (graph definitions, the
optimizer, the mesh) and compiles

    step(state: TrainState, frozen: dict of pure dicts, batch: dict of arrays)
        -> (state, metrics)

with explicit in/out shardings and the state donated. Inside: the frozen encoders turn the
pipeline batch into a TrainBatch, the flow-matching loss and its gradient w.r.t. the DiT, the
optimizer update, EMA, and the NaN guard (a non-finite loss or gradient keeps the old
parameters, optimizer state and EMA, and counts the bad step).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from avatarv_jax.diffusion.guidance import ConditionDropout
from avatarv_jax.diffusion.objective import flow_matching_loss
from avatarv_jax.parallel.sharding import (logical_to_mesh_spec, state_logical_axes,
                                           state_shardings, use_rules)
from avatarv_jax.posttrain.rewards import ProbeRewards
from avatarv_jax.training.aux_losses import ProbeAuxLosses, check_aux_config
from avatarv_jax.training.batch import encode_batch
from avatarv_jax.training.optimizer import ema_update
from avatarv_jax.training.state import TrainState


class ModuleTemplate:
    """A module's graph definition and abstract parameter State: turns pure dicts back into
    the module inside traced code, and gives its logical axes and shardings."""

    def __init__(self, module: nnx.Module):
        self.graphdef, abstract, rest = nnx.split(nnx.eval_shape(lambda: module), nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise ValueError(f"{type(module).__name__} holds non-parameter state; the trainer "
                             "expects parameters only")
        self.rest = rest
        self.abstract = abstract

    def merge(self, pure: Mapping) -> nnx.Module:
        state = jax.tree.map(lambda x: x, self.abstract)    # a fresh State to fill
        nnx.replace_by_pure_dict(state, pure)
        return nnx.merge(self.graphdef, state, self.rest)

    def logical_axes(self) -> dict:
        return nnx.to_pure_dict(state_logical_axes(self.abstract))

    def shardings(self, mesh: Mesh, rules) -> dict:
        return nnx.to_pure_dict(state_shardings(self.abstract, mesh, rules))


def module_params(module: nnx.Module) -> dict:
    """The module's parameters as a pure dict."""
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def _path_keys(path) -> tuple:
    return tuple(getattr(p, "key", getattr(p, "name", getattr(p, "idx", None))) for p in path)


def mirror_shardings(tree, params, param_shardings, mesh: Mesh):
    """Shardings for a tree holding copies of the parameters (optimizer moments): a leaf whose
    path ends in a parameter's path and has its shape takes that parameter's sharding; every
    other leaf (counts, scalars) is replicated."""
    by_path = {}
    flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_s = jax.tree.leaves(param_shardings)
    for (path, leaf), sharding in zip(flat_p, flat_s):
        by_path[_path_keys(path)] = (tuple(leaf.shape), sharding)
    replicated = NamedSharding(mesh, P())

    def one(path, leaf):
        keys = _path_keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh, rules, batch) -> dict:
    """Leading (batch) dimension over the data-parallel axes, the rest replicated."""
    def one(x):
        names = ("activation_batch",) + (None,) * (x.ndim - 1)
        return NamedSharding(mesh, logical_to_mesh_spec(names, rules, x.shape, mesh))
    return jax.tree.map(one, batch)


class TrainStepBuilder:
    """Compiles the train step of one stage for one mesh."""

    def __init__(self, *, dit: ModuleTemplate, frozen: Mapping[str, ModuleTemplate],
                 tx: optax.GradientTransformation, schedule: optax.Schedule, cfg, stage: str,
                 mesh: Mesh):
        self.dit, self.frozen, self.tx, self.schedule = dit, dict(frozen), tx, schedule
        self.cfg, self.stage, self.mesh = cfg, stage, mesh
        self.rules = tuple(tuple(r) for r in cfg.logical_axis_rules)
        self.dropout = ConditionDropout(**dict(cfg.dropout))
        self.seed = int(cfg.train.seed)
        self.num_prefix = int(cfg.train.num_prefix_frames)
        self.ema_decay = float(cfg.optimizer.ema_decay)
        # Stage 3's lip-sync / identity losses on the clean-video estimate (aux_losses.py).
        self.aux_weights = check_aux_config(cfg.get("aux")) if cfg.get("stage") == "sft" else {}
        self.aux_probe = ProbeRewards() if self.aux_weights else None

    # -- shardings -------------------------------------------------------------------------
    def param_shardings(self) -> dict:
        return self.dit.shardings(self.mesh, self.rules)

    def frozen_shardings(self) -> dict:
        return {k: t.shardings(self.mesh, self.rules) for k, t in self.frozen.items()}

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the TrainState, without allocating it."""
        params = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, jnp.float32),
                              nnx.to_pure_dict(self.dit.abstract))
        state = jax.eval_shape(lambda p: TrainState(
            step=jnp.zeros((), jnp.int32), params=p, opt_state=self.tx.init(p),
            ema=p if self.ema_decay > 0 else None, bad_steps=jnp.zeros((), jnp.int32),
            aux=self.initial_aux(p)), params)
        shardings = self.state_shardings(state)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            state, shardings)

    def state_shardings(self, state: TrainState) -> TrainState:
        ps = self.param_shardings()
        replicated = NamedSharding(self.mesh, P())
        aux = None
        if state.aux is not None:
            aux = {"params": ps, "opt_state": mirror_shardings(
                state.aux["opt_state"], state.aux["params"], ps, self.mesh)}
        return TrainState(
            step=replicated, params=ps,
            opt_state=mirror_shardings(state.opt_state, state.params, ps, self.mesh),
            ema=None if state.ema is None else ps, bad_steps=replicated, aux=aux)

    def initial_aux(self, params):
        """The stage's second trained model and its optimizer state (``TrainState.aux``),
        built from the DiT parameters; None for stages that train one model."""
        return None

    # -- the step --------------------------------------------------------------------------
    def loss_and_grads(self, params, frozen_params, batch, key):
        frozen = {k: self.frozen[k].merge(v) for k, v in frozen_params.items()}
        train_batch = encode_batch(frozen, batch, self.stage)
        aux_fn = None
        if self.aux_weights:
            aux_fn = ProbeAuxLosses(self.aux_weights, self.cfg.aux.max_sigma,
                                    frozen["vae"].decode, batch, probe=self.aux_probe)

        def loss_fn(p):
            return flow_matching_loss(self.dit.merge(p), train_batch, key, flow_cfg=self.cfg.flow,
                                      dropout=self.dropout, num_prefix=self.num_prefix,
                                      aux_fn=aux_fn)

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def step_fn(self, state: TrainState, frozen_params, batch):
        with use_rules(self.mesh, self.rules):
            key = jax.random.fold_in(jax.random.key(self.seed), state.step)
            return self.train_step(state, frozen_params, batch, key)

    def train_step(self, state: TrainState, frozen_params, batch, key):
        """One update; stages 1-3: the flow-matching loss (stages 4-5 override this)."""
        (loss, terms), grads = self.loss_and_grads(state.params, frozen_params, batch, key)
        return self.apply_gradients(state, grads, loss, terms)

    def apply_gradients(self, state: TrainState, grads, loss, terms, *, aux=None,
                        aux_finite=True):
        """Optimizer update, EMA and the NaN guard: a non-finite loss or gradient (or a
        non-finite ``aux`` update, ``aux_finite``) keeps the old parameters, optimizer state,
        EMA and aux, and counts the bad step."""
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & aux_finite
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            ema = ema_update(ema, params, self.ema_decay)

        def guarded(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        new_state = TrainState(
            step=state.step + 1, params=guarded(params, state.params),
            opt_state=guarded(opt_state, state.opt_state),
            ema=None if ema is None else guarded(ema, state.ema),
            bad_steps=jnp.where(finite, 0, state.bad_steps + 1).astype(jnp.int32),
            aux=None if aux is None else guarded(aux, state.aux))
        metrics = dict(terms, loss=loss, grad_norm=grad_norm,
                       learning_rate=self.schedule(state.step),
                       finite=finite.astype(jnp.float32))
        return new_state, metrics

    def compile(self, state: TrainState, batch_example: Mapping):
        """The jitted step for states shaped like ``state`` and batches like the example."""
        state_sh = self.state_shardings(state)
        replicated = NamedSharding(self.mesh, P())
        return jax.jit(self.step_fn,
                       in_shardings=(state_sh, self.frozen_shardings(),
                                     batch_sharding(self.mesh, self.rules, batch_example)),
                       out_shardings=(state_sh, replicated), donate_argnums=(0,))

    def put_batch(self, batch: Mapping) -> dict:
        """Host batch (this process's rows) -> global arrays sharded over the batch axes
        (the leading dimension is this process's part of the global batch)."""
        n = jax.process_count()
        # Strings (ids, captions) stay on the host: the step needs numbers only.
        batch = {k: v for k, v in batch.items() if np.asarray(v).dtype.kind in "biuf"}
        global_shapes = {k: jax.ShapeDtypeStruct((v.shape[0] * n,) + v.shape[1:], v.dtype)
                         for k, v in batch.items()}
        shardings = batch_sharding(self.mesh, self.rules, global_shapes)
        return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v),
                                                          global_shapes[k].shape)
                for k, v in batch.items()}

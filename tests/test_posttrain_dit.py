"""Stages 4-5 on the DiT: the guidance embedding, and the distillation target against the
inference path's independent implementation of the three guidance passes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from avatarv_jax.models.dit import DiT, GenInputs, RefInputs
from avatarv_jax.testing import perturb_zero_init, random_inputs, tiny_dit_config
from avatarv_jax.training.step import module_params
from avatarv_jax.training.surgery import transplant


def _student_from(teacher: DiT) -> DiT:
    """A guidance-embedded student made from the teacher by parameter surgery."""
    cfg = dataclasses.replace(teacher.cfg, guidance_embed=True)
    student = DiT(cfg, rngs=nnx.Rngs(5))
    carried, report = transplant(module_params(teacher), module_params(student))
    assert {n.split("/")[0] for n in report.new} == {"guidance_embedder"}
    assert any(n.endswith("linear_2/kernel") for n in report.zero_init)
    state = nnx.state(student, nnx.Param)
    nnx.replace_by_pure_dict(state, carried)
    nnx.update(student, state)
    return student


def test_guidance_embedding_starts_as_the_teacher_then_depends_on_the_scales():
    cfg = tiny_dit_config()
    teacher = perturb_zero_init(DiT(cfg, rngs=nnx.Rngs(0)))
    gen, ref = random_inputs(cfg, prefix_frames=1)
    student = _student_from(teacher)
    want = teacher(gen, ref)
    for scales in ([1.0, 1.0], [5.0, 3.0]):
        g = jnp.broadcast_to(jnp.asarray(scales), (2, 2))
        got = student(gen.replace(guidance=g), ref)
        for k in want:
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))

    student = perturb_zero_init(student, seed=3)   # the embedding now acts
    a = student(gen.replace(guidance=jnp.full((2, 2), 1.0)), ref)["video"]
    b = student(gen.replace(guidance=jnp.full((2, 2), 4.0)), ref)["video"]
    assert float(jnp.abs(a - b).max()) > 1e-3
    # Per-sample scales: row 0 of a mixed batch equals row 0 of the batch at its scale.
    mixed = student(gen.replace(guidance=jnp.asarray([[1.0, 1.0], [4.0, 4.0]])), ref)["video"]
    np.testing.assert_allclose(np.asarray(mixed[0]), np.asarray(a[0]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(mixed[1]), np.asarray(b[1]), atol=1e-5)


def test_guidance_inputs_are_checked():
    cfg = tiny_dit_config()
    gen, ref = random_inputs(cfg)
    with pytest.raises(ValueError, match="guidance_embed = False"):
        DiT(cfg, rngs=nnx.Rngs(0))(gen.replace(guidance=jnp.ones((2, 2))), ref)
    student = DiT(dataclasses.replace(cfg, guidance_embed=True), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="guidance-distilled"):
        student(gen, ref)
    with pytest.raises(ValueError, match=r"expected \(2, 2\)"):
        student(gen.replace(guidance=jnp.ones((2, 3))), ref)


def test_distillation_target_equals_the_inference_guided_velocity():
    """The trainer's three teacher passes (posttrain.stages) against inference's
    ``chunk_velocity`` over ``joint_predictor``, written separately."""
    from avatarv_jax.diffusion.objective import TrainBatch
    from avatarv_jax.inference.guided import JointInputs, chunk_velocity, joint_predictor
    from avatarv_jax.posttrain.stages import guided_teacher_velocity, split_conditions
    from avatarv_jax.training.step import ModuleTemplate

    cfg = tiny_dit_config()
    teacher = perturb_zero_init(DiT(cfg, rngs=nnx.Rngs(1)))
    gen, ref = random_inputs(cfg, prefix_frames=1, gen_frames=3)
    tb = TrainBatch(latents=gen.latents, text=gen.text, motion=gen.motion, audio=gen.audio,
                    ref_latents=ref.latents, ref_motion=ref.motion, ref_audio=ref.audio)
    cond = split_conditions(tb, num_prefix=1)
    template = ModuleTemplate(teacher)
    sigma = 0.6
    x = {k: jax.random.normal(jax.random.key(7), v.shape) for k, v in cond.x0.items()}
    got = guided_teacher_velocity(template, module_params(teacher), cond, x, sigma,
                                  jnp.full((2,), 4.0), jnp.full((2,), 2.5))
    ref_in = RefInputs(latents=ref.latents, motion=ref.motion, audio=ref.audio,
                       valid_frames=jnp.full((2,), ref.latents.shape[1], jnp.int32))
    predict = joint_predictor(teacher, JointInputs(text=gen.text, audio=gen.audio, ref=ref_in))
    want = chunk_velocity(predict, text_scale=4.0, audio_scale=2.5, prefix=cond.prefix)(x, sigma)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), atol=2e-5,
                                   rtol=2e-5)


def test_guidance_embedded_sampling_is_one_pass():
    """With a guidance-distilled DiT the chunk velocity runs one pass told the scales."""
    from avatarv_jax.inference.guided import chunk_velocity

    calls = []

    def predict(gen: GenInputs, which: str):
        calls.append((which, None if gen.guidance is None else np.asarray(gen.guidance)))
        return {"video": gen.latents}

    x = {"video": jnp.zeros((2, 3, 4, 4, 16))}
    chunk_velocity(predict, text_scale=5.0, audio_scale=3.0, guidance_embedded=True)(x, 0.5)
    assert [c[0] for c in calls] == ["full"]
    np.testing.assert_array_equal(calls[0][1], [[5.0, 3.0], [5.0, 3.0]])
    calls.clear()
    chunk_velocity(predict, text_scale=5.0, audio_scale=3.0)(x, 0.5)
    assert sorted(c[0] for c in calls) == ["full", "text", "uncond"]

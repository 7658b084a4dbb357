"""One GI fine-tune step (loss and gradients w.r.t. the W_v/W_o delta) against a PyTorch oracle.

The oracle (`tests/torch_reference.gi_finetune_loss`) is GI's `train_reverse_motion_with_attnflip.py` step
(algorithms.md §3.4) on diffusers' own `UNetSpatioTemporalConditionModel`: a frozen pass on flip_t(z_t) with the
reference image whose temporal attn1 probabilities are captured (detached torch tensors), a trainable pass on z_t
with the cond image whose temporal attn1 layers use those maps rotated by 180°, the EDM v-prediction x0 and the
(1+σ²)/σ² weighted loss; torch autograd gives the gradient w.r.t. a nonzero delta added to every W_v/W_o (8
tensors in the tiny config, 32 in SVD). The jinbetween UNet is converted from the torch model's weights, as in
test_sampler_oracles. Both sides get the same σ (two clips, different σ) and ε.

Tolerance 1e-4 relative (max|Δ|/max|ref| per tensor, fp32, highest matmul precision): one tiny-UNet call agrees
with diffusers to ~1e-6 (test_unet_parity); a step runs two UNet passes and the backward of one, whose gradients
are sums over every pixel, frame and clip, taken in another order by XLA than by torch, so the expected error is
a few 1e-6 and 1e-4 leaves ~50× headroom while staying far below what any mechanism moves. Measured (2 cores):
loss ≤ 1e-7 (equal in float32 in every run), gradients ≤ 2.2e-6 per tensor, with and without remat (remat is
checked against the plain step at 1e-5 in test_finetune_loop.test_remat_gives_the_same_loss_and_gradients, for full
and high-resolution-only remat, so the oracle is compared with the plain step only). Switching
one mechanism off in the oracle (maps not rotated, delta dropped, cond/reference images swapped) moves the loss
by 3e-3 to 6e-3 and the gradients by 0.4 to 2.3.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jinbetween import config
from jinbetween.conditioning import Conditioning
from jinbetween.finetune import ClipBatch, backward_loss
from jinbetween.models import abstract_unet
from jinbetween.models.delta import delta_keys, delta_shapes
from jinbetween.models.naming import flat_params, merge_params
from jinbetween.models.state import ModelState
from jinbetween.weights.loading import convert_tensors
from jinbetween.weights.tensors import TensorSource

from tests.helpers import relative_error, torch_single_thread  # noqa: F401 (autouse fixture)
from tests.torch_reference import TorchConditioning, diffusers_unet, gi_finetune_loss, state_dict_numpy

TOL = 1e-4
CFG = config.tiny()
FRAMES, SIZE, BATCH = 3, 8, 2
SIGMA = np.array([0.45, 2.7], np.float32)  # one clip each side of GI's median σ = e^0.7 ≈ 2
DELTA_SCALE = 0.05


@pytest.fixture(scope="module")
def models():
    """(torch frozen forward UNet, torch trainable UNet (its parameters frozen: the delta is what trains),
    the jinbetween UNet with the same weights)."""
    forward = diffusers_unet(CFG, seed=31).requires_grad_(False)
    abstract = abstract_unet(CFG)
    params = convert_tensors(TensorSource.from_arrays(state_dict_numpy(forward)), flat_params(abstract), model="UNet")
    return forward, copy.deepcopy(forward), ModelState.of(merge_params(abstract, params))


@pytest.fixture(scope="module")
def inputs() -> dict[str, np.ndarray]:
    """A batch of reversed clips and its conditioning, ε and the delta, as numpy (channels-last, delta `[in, out]`)."""
    rng = np.random.default_rng(32)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    latent = (BATCH, FRAMES, SIZE, SIZE, CFG.out_channels)
    out = dict(latents=normal(*latent), eps=normal(*latent), sigma=SIGMA,
               delta={k: DELTA_SCALE * normal(*shape) for k, shape in delta_shapes(CFG).items()})
    for name in ("cond", "reference"):
        out[name] = dict(image_embeds=normal(BATCH, 1, CFG.cross_attention_dim[0]),
                         image_latent=normal(BATCH, SIZE, SIZE, CFG.out_channels),
                         added_time_ids=np.tile(np.array([6.0, 127.0, 0.02], np.float32), (BATCH, 1)))
    return out


@pytest.fixture(scope="module")
def ours(models, inputs) -> tuple[float, dict[str, np.ndarray]]:
    """jinbetween's (loss, d loss/d delta) from `backward_loss` with the explicit σ and ε."""
    _, _, unet = models

    def conditioning(c):
        return Conditioning(clean_latent=jnp.zeros_like(c["image_latent"]), **{k: jnp.asarray(v) for k, v in c.items()})

    batch = ClipBatch(latents=jnp.asarray(inputs["latents"]), cond=conditioning(inputs["cond"]),
                      reference=conditioning(inputs["reference"]))
    delta = {k: jnp.asarray(v) for k, v in inputs["delta"].items()}
    loss_and_grads = jax.jit(jax.value_and_grad(backward_loss))
    loss, grads = loss_and_grads(delta, unet, batch, jnp.asarray(inputs["sigma"]), jnp.asarray(inputs["eps"]))
    return float(loss), {k: np.asarray(v) for k, v in grads.items()}


def to_torch(x: np.ndarray) -> torch.Tensor:
    """`[..., h, w, C]` channels-last array → `[..., C, h, w]` tensor."""
    return torch.from_numpy(np.array(x)).movedim(-1, -3)


def oracle(models, inputs, *, rotate: bool = True, delta: bool = True,
           swap_images: bool = False) -> tuple[float, dict[str, np.ndarray]]:
    """The torch (loss, d loss/d delta `[in, out]`); the keywords switch a mechanism off, to show the test can fail."""
    forward, trainable, _ = models
    deltas = {k: torch.from_numpy(v.copy() if delta else np.zeros_like(v)).requires_grad_()
              for k, v in inputs["delta"].items()}
    weights = dict(trainable.named_parameters())
    # torch Linear weights are [out, in]: the delta in NNX layout [in, out] enters transposed.
    params = {k: weights[k] + d.T for k, d in deltas.items()}
    cond, reference = (TorchConditioning(torch.from_numpy(c["image_embeds"]), to_torch(c["image_latent"]),
                                         torch.from_numpy(c["added_time_ids"]))
                       for c in (inputs["cond"], inputs["reference"]))
    if swap_images:
        cond, reference = reference, cond
    loss = gi_finetune_loss(forward, trainable, to_torch(inputs["latents"]), torch.from_numpy(inputs["sigma"]),
                            to_torch(inputs["eps"]), cond, reference, params=params, rotate=rotate)
    loss.backward()
    return loss.item(), {k: d.grad.numpy() for k, d in deltas.items()}


def test_loss_and_delta_gradients_match_the_torch_oracle(models, inputs, ours):
    loss, grads = ours
    ref_loss, ref_grads = oracle(models, inputs)
    assert sorted(grads) == sorted(delta_keys(CFG)) == sorted(ref_grads)
    errors = {k: relative_error(grads[k], ref_grads[k]) for k in ref_grads}
    loss_err = abs(loss - ref_loss) / abs(ref_loss)
    worst = max(errors, key=errors.get)
    assert loss_err <= TOL, f"loss {loss:.7g} vs torch oracle {ref_loss:.7g}: relative error {loss_err:.3g} > {TOL:g}"
    assert errors[worst] <= TOL, (f"d loss/d delta at {worst}: max|Δ|/max|ref| = {errors[worst]:.3g} > {TOL:g} "
                                  f"(all: { {k: f'{e:.2g}' for k, e in errors.items()} })")
    assert all(np.abs(g).max() > 0 for g in ref_grads.values()), "some oracle gradient is zero: a vacuous comparison"


@pytest.mark.parametrize("change", [dict(rotate=False), dict(delta=False), dict(swap_images=True)],
                         ids=["unrotated_maps", "delta_dropped", "cond_and_reference_swapped"])
def test_oracle_tells_a_switched_off_mechanism_apart(models, inputs, ours, change):
    """The comparison above can fail: the oracle without one of GI's mechanisms differs from our step ≫ TOL.

    The loss moves less than the gradients (3e-3 to 6e-3 against 0.4 to 2.3): with random weights most of
    the loss is the x0 error that no attention map changes, so its bar is 10·TOL and the gradients' 100·TOL.
    """
    loss, grads = ours
    changed_loss, changed_grads = oracle(models, inputs, **change)
    loss_err = abs(loss - changed_loss) / abs(changed_loss)
    grad_err = max(relative_error(grads[k], changed_grads[k]) for k in grads)
    assert loss_err > 10 * TOL and grad_err > 100 * TOL, \
        f"with {change} the oracle is only {loss_err:.3g} (loss) / {grad_err:.3g} (gradients) from our step"

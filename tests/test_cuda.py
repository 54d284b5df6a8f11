"""On a GPU (skipped without one): exact implicit gradients, per-image counts, a mixed-precision
training step. Run by scripts/gpu_session.py on the GPU machine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from deq import DEQClassifier, DEQFixedPoint, ModelConfig, ResNetCell

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_gradcheck_input_and_parameters_sync_free_loop():
    """The implicit gradient on the GPU, where the solver checks convergence every 4 iterations."""
    torch.manual_seed(0)
    cell = ResNetCell(2, 2, 1, 0.1).to("cuda", torch.float64)
    kw = {"tol": 1e-12, "max_iter": 500}
    layer = DEQFixedPoint(cell, backward_kwargs=dict(kw), **kw)
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(1, 2, 2, 2, dtype=torch.float64, device="cuda", requires_grad=True)

    def fn(x, *weights):
        return functional_call(layer, dict(zip(names, weights, strict=True)), (x,))[0]

    inputs = (x, *(p.detach().clone().requires_grad_() for p in layer.parameters()))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("solver", ["anderson", "forward", "broyden"])
def test_cuda_per_image_counts_equal_solving_each_image_alone(solver):
    torch.manual_seed(0)
    model = DEQClassifier(ModelConfig(init_std=0.2)).cuda().eval()
    images = torch.rand(6, 3, 32, 32, device="cuda")
    x = model.inject(images)
    _, stats = model.deq.solve(x, solver=solver, tol=1e-4, max_iter=60)
    alone = [int(model.deq.solve(x[i : i + 1], solver=solver, tol=1e-4, max_iter=60)[1].sample_evals[0])
             for i in range(len(x))]  # fmt: skip
    # batch-size-dependent kernels may move a count across the tolerance by one iteration
    assert (stats.sample_evals.cpu() - torch.tensor(alone)).abs().max() <= 1
    assert stats.n_evals >= max(stats.sample_evals.tolist())


def test_cuda_bf16_channels_last_training_step_implicit_with_both_regularisers():
    torch.manual_seed(0)
    model = DEQClassifier(ModelConfig(solver_kwargs={"tol": 1e-2, "max_iter": 20})).cuda()
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.rand(32, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        logits, info = model(x, return_info=True, jacobian_penalty=True, spectral_radius_iters=4)
        loss = F.cross_entropy(logits.float(), y) + info.jacobian_penalty + info.spectral_radius.mean()
    assert info.spectral_radius.shape == (32,) and torch.isfinite(info.spectral_radius).all()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert info.backward is not None and info.backward.n_evals > 0
    assert not info.forward.early_exit  # GPUs keep whole-batch solves unless asked
    assert info.forward.sample_residuals.dtype == torch.float32  # solver state stays float32
    opt.step()


@pytest.mark.parametrize("solver", ["anderson", "forward", "broyden"])
def test_cuda_early_exit_keeps_answers_and_counts(solver):
    """Converged images leave the solve at the sync-free loop's checks (every 4 iterations)."""
    torch.manual_seed(0)
    model = DEQClassifier(ModelConfig(init_std=0.2)).cuda().eval()
    images = torch.rand(16, 3, 32, 32, device="cuda")
    runs = {
        ee: model.predict(images, solver=solver, tol=1e-4, max_iter=60, early_exit=ee) for ee in (False, True)
    }
    (logits, full), (logits_exit, exit_) = runs[False], runs[True]
    assert exit_.early_exit and not full.early_exit
    done = (full.sample_residuals < 1e-4) & (exit_.sample_residuals < 1e-4)  # (not chaotic ones)
    assert torch.equal(logits.argmax(1)[done], logits_exit.argmax(1)[done])
    # a batch narrowed to a few images may round differently in cuDNN: one iteration either way
    assert (exit_.sample_evals - full.sample_evals).abs().max() <= 1
    assert exit_.sample_residuals.shape == (16,) and exit_.converged == full.converged

"""ProjectedSGD: the same iterates as torch SGD + project_weights_ (section 4.4), in float64.

Compared step for step: the loss, each weight row's direction ``W_i / ||W_i||``, gamma, beta,
the momentum buffers, and the function the net computes -- over batch sizes that take both the
output-side path (rows < in_features) and the weight-side path of the layer."""

from __future__ import annotations

import copy

import pytest
import torch

from normprop import build_model, fold, paper_optimizer, project_weights_, train_step
from normprop.fused_sgd import ProjectedSGD
from normprop.layers import NormPropConv2d, NormPropLinear


def _directions(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in net.named_modules():
        if isinstance(m, (NormPropLinear, NormPropConv2d)):
            w = m.weight.detach().flatten(1)
            out[name] = w / w.norm(dim=1, keepdim=True)
    return out


@pytest.mark.parametrize("spec,shape,activation", [
    ("mlp:24,24,24", 20, "relu"),
    ("mlp:24,16", 20, "tanh"),
    ("mlp:24", 20, "prelu"),
    ("C(6,3,1,1)-P(2,2,0,max)-C(8,3,1,1)-P(4,4,0,avg)", (2, 8, 8), "relu"),
])
def test_same_iterates_as_sgd_plus_projection(spec, shape, activation) -> None:
    torch.manual_seed(0)
    ref = build_model(spec, shape, 5, activation=activation, data_norm="running").double()
    project_weights_(ref)  # unit rows in float64 (float32's are unit to ~1e-8 only)
    fused = copy.deepcopy(ref)
    ref_opt = paper_optimizer(ref, lr=0.05, weight_decay=5e-3)
    opt = ProjectedSGD(fused, lr=0.05, weight_decay=5e-3)
    assert opt.fused_layers  # every net here ends in a NormPropLinear
    full = (shape,) if isinstance(shape, int) else shape
    g = torch.Generator().manual_seed(1)
    for step, batch in enumerate([1, 8, 30, 1, 64, 8, 2, 30, 16, 1] * 3):
        x = torch.randn(batch, *full, dtype=torch.float64, generator=g) * 2 + 0.5
        y = torch.randint(0, 5, (batch,), generator=g)
        a = train_step(ref, ref_opt, x, y)
        # train_step knows ProjectedSGD projects in its step (project=True is then a no-op).
        b = train_step(fused, opt, x, y, project=step % 2 == 0)
        assert abs(a.loss - b.loss) < 1e-9 * max(1.0, abs(a.loss)), step
        assert torch.allclose(a.output, b.output, atol=1e-9), step
    for name, d in _directions(ref).items():
        assert torch.allclose(_directions(fused)[name], d, atol=1e-9), name
    fused_state = dict(fused.named_parameters())
    for name, p in ref.named_parameters():
        if not name.endswith("weight") or p.dim() == 1:
            assert torch.allclose(fused_state[name], p, atol=1e-9), name
    # The un-normalised weights really are un-normalised (no divide pass), and folding and
    # evaluation see the same function as the reference.
    norms = torch.cat([m.weight.flatten(1).norm(dim=1) for m in opt.fused_layers])
    assert (norms - 1).abs().max() > 1e-3
    ref.eval()
    fused.eval()
    x = torch.randn(50, *full, dtype=torch.float64, generator=g)
    with torch.no_grad():
        assert torch.allclose(fused(x), ref(x), atol=1e-9)
        assert torch.allclose(fold(fused)(x), ref(x), atol=1e-9)


def test_detach_returns_to_the_plain_backward() -> None:
    torch.manual_seed(0)
    net = build_model("mlp:12", 6, 3).double()
    opt = ProjectedSGD(net, lr=0.1)
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    for _ in range(3):
        train_step(net, opt, x, y, project=False)
    before = net(x).detach()
    opt.detach()
    assert all(m.fused_decay is None for m in opt.fused_layers)
    for m in opt.fused_layers:
        assert torch.allclose(m.weight.norm(dim=1), torch.ones(m.weight.shape[0],
                                                                dtype=torch.float64))
    assert torch.allclose(net(x), before, atol=1e-12)
    # Plain gradients again: autograd through the composite formula agrees.
    net.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    fast = [p.grad.clone() for p in net.parameters()]
    for m in opt.fused_layers:
        m.fast_path = False
    net.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    for a, p in zip(fast, net.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-12)


def test_step_without_a_forward_is_an_error() -> None:
    net = build_model("mlp:8", 4, 2)
    opt = ProjectedSGD(net, lr=0.1)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="training forward"):
        opt.step()

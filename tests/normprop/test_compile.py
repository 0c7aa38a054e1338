"""``torch.compile`` of a NormProp net: the same function and gradients as eager, and no
recompilation as the weights change step after step (the fast path's unit-row key is Python
state that would otherwise be a guard)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from normprop import build_model, paper_optimizer, project_weights_


def test_compiled_net_matches_eager_and_compiles_once() -> None:
    torch.manual_seed(0)
    net = build_model("mlp:32,32", 12, 4, data_norm="running")
    opt = paper_optimizer(net, lr=0.05)
    compiled = torch.compile(net)
    g = torch.Generator().manual_seed(1)
    torch._dynamo.reset()
    counters.clear()
    graphs_after_first = None
    for step in range(6):
        x = torch.randn(8, 12, generator=g) * 2 + 1
        y = torch.randint(0, 4, (8,), generator=g)
        # Eager reference on a copy of the current state (the data layer's running update too).
        eager = build_model("mlp:32,32", 12, 4, data_norm="running")
        eager.load_state_dict(net.state_dict())
        out_eager = eager(x)
        grads_eager = torch.autograd.grad(F.cross_entropy(out_eager, y), list(eager.parameters()))
        opt.zero_grad(set_to_none=True)
        out = compiled(x)
        F.cross_entropy(out, y).backward()
        assert torch.allclose(out, out_eager, atol=1e-5), (out - out_eager).abs().max()
        for (name, p), ge in zip(net.named_parameters(), grads_eager):
            assert torch.allclose(p.grad, ge, atol=1e-5), (name, (p.grad - ge).abs().max())
        opt.step()
        project_weights_(net)
        if step == 0:
            graphs_after_first = counters["stats"]["unique_graphs"]
    assert graphs_after_first and counters["stats"]["unique_graphs"] == graphs_after_first


def test_compiled_running_data_norm_keeps_its_count() -> None:
    """Regression: inductor dropped in-place updates of the 0-d float64 ``count`` buffer, so a
    compiled running DataNorm never left its first-sample fallback (std 1)."""
    from normprop import DataNorm

    torch.manual_seed(0)
    compiled_norm, eager_norm = DataNorm(5, mode="running"), DataNorm(5, mode="running")
    compiled = torch.compile(compiled_norm)
    for _ in range(3):
        x = torch.randn(8, 5) * 2 + 1
        assert torch.allclose(compiled(x), eager_norm(x), atol=1e-6)
    assert float(compiled_norm.count) == float(eager_norm.count) == 24.0
    assert compiled_norm.count.dim() == 0  # the checkpoint layout is unchanged

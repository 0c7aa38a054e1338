"""The library on a GPU: the same numbers as on the CPU (skipped where torch sees no GPU).

The CPU tests prove the layers exact against eq. 9/11 written out with autograd; these prove the
CUDA kernels compute the same function, in float64 so that the comparison is tight.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normprop import (NormPropConv2d, NormPropLinear, build_model, fold, paper_optimizer,
                      project_weights_, train_step)

from test_layers import scramble_  # rows far from unit norm, gamma and beta moved

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
GPU = torch.device("cuda")


def _forward_backward(layer: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor
                      ) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = layer(x)
    grads = torch.autograd.grad((out * upstream).sum(), [x, *layer.parameters()])
    return [out.detach().cpu(), *(g.cpu() for g in grads)]


@pytest.mark.parametrize("make,shape", [
    (lambda: NormPropLinear(33, 17, activation="relu"), (40, 33)),
    (lambda: NormPropLinear(33, 17, activation="prelu", num_parameters=17), (1, 33)),
    (lambda: NormPropLinear(33, 17, activation="tanh"), (8, 33)),
    (lambda: NormPropLinear(33, 17, activation=None), (8, 33)),
    (lambda: NormPropConv2d(4, 8, 3, stride=2, padding=1), (2, 4, 9, 8)),
    (lambda: NormPropConv2d(4, 8, 3, padding=1, groups=2, activation="elu"), (1, 4, 7, 7)),
])
@pytest.mark.parametrize("unit_rows", [True, False])
def test_layer_on_gpu_matches_cpu_float64(make, shape, unit_rows) -> None:
    torch.manual_seed(0)
    cpu = make().double()
    scramble_(cpu, seed=1)
    if unit_rows:
        project_weights_(cpu)
    gpu = make().double().to(GPU)
    gpu.load_state_dict(cpu.state_dict())
    if unit_rows:  # the fast path's unit-row shortcut must hold on the GPU copy too
        project_weights_(gpu)
        assert gpu.rows_known_unit()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, dtype=torch.float64, generator=g)
    out_shape = cpu(x).shape
    upstream = torch.randn(*out_shape, dtype=torch.float64, generator=g)
    want = _forward_backward(cpu, x, upstream)
    got = _forward_backward(gpu, x.to(GPU), upstream.to(GPU))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-10), (a - b).abs().max()


@pytest.mark.parametrize("batch", [1, 16])
def test_training_on_gpu_follows_the_cpu(batch: int) -> None:
    """40 SGD steps (momentum, decay, projection, running data norm) land on the same weights."""
    torch.manual_seed(0)
    nets = {}
    for dev in ("cpu", "cuda"):
        torch.manual_seed(0)
        nets[dev] = build_model("mlp:64,64", 20, 5, data_norm="running").double().to(dev)
    opts = {dev: paper_optimizer(net, lr=0.01) for dev, net in nets.items()}
    g = torch.Generator().manual_seed(3)
    for _ in range(40):
        x = torch.randn(batch, 20, dtype=torch.float64, generator=g) * 3 + 1
        y = torch.randint(0, 5, (batch,), generator=g)
        losses = [train_step(nets[d], opts[d], x.to(d), y.to(d)).loss for d in ("cpu", "cuda")]
        assert abs(losses[0] - losses[1]) < 1e-9
    cpu_state, gpu_state = nets["cpu"].state_dict(), nets["cuda"].state_dict()
    for k, v in cpu_state.items():
        assert torch.allclose(gpu_state[k].cpu(), v, rtol=1e-8, atol=1e-10), k
    for layer in nets["cuda"].modules():
        if isinstance(layer, NormPropLinear) and layer.activation is not None:
            norms = layer.weight.norm(dim=1)
            assert torch.allclose(norms, torch.ones_like(norms), atol=1e-12)


@pytest.mark.parametrize("backend", ["auto", "eager", "compile", "project"])
def test_projected_sgd_on_gpu_follows_sgd_plus_projection_on_cpu(backend: str) -> None:
    """ProjectedSGD on the GPU -- eager, "project" (auto's choice there) and "compile" (Triton
    kernels) -- takes the steps of torch SGD + project_weights_ on the CPU: the same losses and
    row directions."""
    from normprop import ProjectedSGD

    torch.manual_seed(0)
    ref = build_model("mlp:64,64", 20, 5, data_norm="running").double()
    project_weights_(ref)
    gpu = build_model("mlp:64,64", 20, 5, data_norm="running").double()
    gpu.load_state_dict(ref.state_dict())
    gpu = gpu.to(GPU)
    ref_opt = paper_optimizer(ref, lr=0.02)
    opt = ProjectedSGD(gpu, lr=0.02, backend=backend)
    assert opt.backend == ("project" if backend == "auto" else backend)
    g = torch.Generator().manual_seed(5)
    for batch in [1, 16, 64, 3] * 8:
        x = torch.randn(batch, 20, dtype=torch.float64, generator=g) * 3 + 1
        y = torch.randint(0, 5, (batch,), generator=g)
        a = train_step(ref, ref_opt, x, y).loss
        b = train_step(gpu, opt, x.to(GPU), y.to(GPU), project=False).loss
        assert abs(a - b) < 1e-9, (batch, a, b)
    for r, m in zip(ref.modules(), gpu.modules()):
        if isinstance(r, NormPropLinear):
            w = m.weight.detach().cpu()
            assert torch.allclose(w / w.norm(dim=1, keepdim=True), r.weight, atol=1e-9)


@pytest.fixture
def no_tf32():
    """cuDNN convolutions default to TF32 (10-bit mantissa) on Ampere and later, which moves
    both nets by ~1e-3; the exactness claim is for float32 arithmetic."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_fold_on_gpu_is_the_same_function(no_tf32) -> None:
    torch.manual_seed(0)
    net = build_model("C(16,3,1,1)-P(2,2,0,max)-C(16,3,1,1)-P(8,8,0,avg)", (3, 16, 16), 10,
                      data_norm="running").to(GPU)
    opt = paper_optimizer(net, lr=0.01)
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        x = torch.randn(8, 3, 16, 16, generator=g).to(GPU)
        y = torch.randint(0, 10, (8,), generator=g).to(GPU)
        train_step(net, opt, x, y)
    net.eval()
    folded = fold(net)
    x = torch.randn(64, 3, 16, 16, generator=g).to(GPU)
    with torch.no_grad():
        diff = (folded(x) - net(x)).abs().max().item()
        assert F.softmax(net(x), 1).isfinite().all()
    assert diff < 1e-4

"""ProjectedSGD: the same iterates as torch SGD + project_weights_ (section 4.4), in float64.

Compared step for step: the loss, each weight row's direction ``W_i / ||W_i||``, gamma, beta,
the momentum buffers, and the function the net computes -- over batch sizes that take both the
output-side path (rows < in_features) and the weight-side path of the layer."""

from __future__ import annotations

import copy
import warnings

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


def _assert_same_point(ref: torch.nn.Module, fused: torch.nn.Module, atol: float = 1e-9) -> None:
    """Every NormProp row points the same way, and every other parameter is equal."""
    for name, d in _directions(ref).items():
        assert torch.allclose(_directions(fused)[name], d, atol=atol), name
    fused_state = dict(fused.named_parameters())
    for name, p in ref.named_parameters():
        if not name.endswith("weight") or p.dim() == 1:
            assert torch.allclose(fused_state[name], p, atol=atol), name


def _twins(lr: float = 0.1, **opt_kwargs):
    """A small float64 MLP with unit rows, a copy, torch SGD for the first and ProjectedSGD
    for the copy, and one batch: (ref, ref_opt, net, opt, x, y)."""
    torch.manual_seed(0)
    ref = build_model("mlp:10", 6, 3).double()
    project_weights_(ref)
    net = copy.deepcopy(ref)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    return ref, paper_optimizer(ref, lr=lr), net, ProjectedSGD(net, lr=lr, **opt_kwargs), x, y


def _assert_plain_gradients(net: torch.nn.Module, layers: list, x: torch.Tensor,
                            y: torch.Tensor) -> None:
    """weight.grad is the gradient: the fast path's backward equals autograd through the
    composite formula (eq. 9) for every parameter."""
    net.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    fast = [p.grad.clone() for p in net.parameters()]
    for m in layers:
        m.fast_path = False
    net.zero_grad()
    torch.nn.functional.cross_entropy(net(x), y).backward()
    for a, p in zip(fast, net.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-12)


@pytest.mark.parametrize("backend", ["eager", "native", "project"])
@pytest.mark.parametrize("spec,shape,activation", [
    ("mlp:24,24,24", 20, "relu"),
    ("mlp:24,16", 20, "tanh"),
    ("mlp:24", 20, "prelu"),
    ("C(6,3,1,1)-P(2,2,0,max)-C(8,3,1,1)-P(4,4,0,avg)", (2, 8, 8), "relu"),
])
def test_same_iterates_as_sgd_plus_projection(spec, shape, activation, backend) -> None:
    torch.manual_seed(0)
    ref = build_model(spec, shape, 5, activation=activation, data_norm="running").double()
    project_weights_(ref)  # unit rows in float64 (float32's are unit to ~1e-8 only)
    fused = copy.deepcopy(ref)
    ref_opt = paper_optimizer(ref, lr=0.05, weight_decay=5e-3)
    opt = ProjectedSGD(fused, lr=0.05, weight_decay=5e-3, backend=backend)
    assert opt.fused_layers and opt.backend == backend  # every net here ends in a NormPropLinear
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
    _assert_same_point(ref, fused)
    # The un-normalised weights really are un-normalised (no divide pass), and folding and
    # evaluation see the same function as the reference.
    norms = torch.cat([m.weight.flatten(1).norm(dim=1) for m in opt.fused_layers])
    if backend == "project":  # the plain recipe: unit rows after every step
        assert (norms - 1).abs().max() < 1e-12
    else:
        assert (norms - 1).abs().max() > 1e-3
    ref.eval()
    fused.eval()
    x = torch.randn(50, *full, dtype=torch.float64, generator=g)
    with torch.no_grad():
        assert torch.allclose(fused(x), ref(x), atol=1e-9)
        assert torch.allclose(fold(fused)(x), ref(x), atol=1e-9)


def test_the_project_backend_is_the_plain_recipe() -> None:
    """backend="project": the layers keep their own backward (weight.grad is dL/dW), and the
    step is torch's SGD then the projection -- bit for bit paper_optimizer + project_weights_
    in float32, not only to rounding."""
    torch.manual_seed(0)
    ref = build_model("mlp:16,16", 6, 3, data_norm="running")
    net = copy.deepcopy(ref)
    for model in (ref, net):  # the same rows, and known unit in both (a copy is not)
        project_weights_(model)
    ref_opt = paper_optimizer(ref, lr=0.1, weight_decay=5e-3, fused=True)
    opt = ProjectedSGD(net, lr=0.1, weight_decay=5e-3, backend="project")
    assert opt.backend == "project" and all(m.fused_link is None for m in opt.fused_layers)
    g = torch.Generator().manual_seed(3)
    for batch in (1, 5, 12, 1):
        x, y = torch.randn(batch, 6, generator=g), torch.randint(0, 3, (batch,), generator=g)
        train_step(ref, ref_opt, x, y)
        train_step(net, opt, x, y, project=False)
        for a, b in zip(ref.parameters(), net.parameters()):
            assert torch.equal(a, b)
        assert all(m.rows_known_unit() for m in opt.fused_layers)
    x, y = torch.randn(5, 6, dtype=torch.float64, generator=g), torch.tensor([0, 1, 2, 0, 1])
    _assert_plain_gradients(net.double().eval(), opt.fused_layers, x, y)  # eval: stats fixed


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
    _assert_plain_gradients(net, opt.fused_layers, x, y)  # plain gradients again


@pytest.mark.parametrize("backend", ["eager", "native", "compile"])
def test_step_without_a_training_forward_and_backward_is_an_error(backend) -> None:
    net = build_model("mlp:8", 4, 2)
    opt = ProjectedSGD(net, lr=0.1, backend=backend)
    with torch.no_grad():
        net(torch.randn(2, 4))  # an evaluation forward does not count
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    with pytest.raises(RuntimeError, match="training forward and backward"):
        opt.step()


# -- the step's remembered norms ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", "native"])
def test_the_next_forward_uses_the_norms_the_step_took_and_only_while_valid(backend) -> None:
    torch.manual_seed(0)
    net = build_model("mlp:12,12", 6, 3).double()
    opt = ProjectedSGD(net, lr=0.3, backend=backend)
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    train_step(net, opt, x, y, project=False)
    layer = opt.fused_layers[0]
    link = layer.fused_link
    assert link.next_norms is not None
    assert torch.allclose(link.next_norms, layer.weight.detach().norm(dim=1), rtol=1e-15,
                          atol=0)
    layer(x)  # a training forward: takes the step's norms, reads no weight
    assert link.norms is link.next_norms
    # Any tracked change to the weight voids them: the forward reads the norms again, and
    # the layer computes eq. 9 for the weight as it is now.
    with torch.no_grad():
        layer.weight[0].mul_(3.0)
    out = layer(x)
    assert link.norms is not link.next_norms
    assert torch.allclose(link.norms, layer.weight.detach().norm(dim=1), rtol=0, atol=1e-15)
    layer.fast_path = False
    assert torch.allclose(out, layer(x), atol=1e-12)


def _assert_eq9(layer: NormPropLinear, inputs: torch.Tensor, prepared: bool) -> None:
    """The layer's training forward takes the step's constants (or not), and computes what the
    composite formula computes."""
    link = layer.fused_link
    out = layer(inputs)
    assert (link.prepared is not None) == prepared
    if prepared:
        assert link.prepared is link.next_prepared
    layer.fast_path = False
    assert torch.allclose(out, layer(inputs), atol=1e-12)
    layer.fast_path = True


def test_the_native_step_hands_the_forward_its_constants_and_only_while_valid() -> None:
    """The C step computes each layer's r, k and shift of eq. 9 from the new norms, gamma and
    beta; the next forward takes them -- until gamma, beta or the weight change, when it
    computes them again. Either way the layer computes eq. 9 for its parameters as they are."""
    torch.manual_seed(0)
    net = build_model("mlp:12,12", 6, 3).double()
    opt = ProjectedSGD(net, lr=0.3, backend="native")
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    train_step(net, opt, x, y, project=False)
    h = torch.randn(4, 6, dtype=torch.float64)  # 4 rows < 6 inputs: the output-side path
    for layer, inputs in ((opt.fused_layers[0], h), (opt.fused_layers[-1], torch.randn(
            4, 12, dtype=torch.float64))):  # a ReLU layer, and the output layer
        _assert_eq9(layer, inputs, prepared=True)
        with torch.no_grad():
            layer.gamma[0] += 0.5
        _assert_eq9(layer, inputs, prepared=False)
    opt.zero_grad()
    train_step(net, opt, x, y, project=False)  # the next step prepares them again
    opt.fused_layers[0](h)
    assert opt.fused_layers[0].fused_link.prepared is not None


# -- native and compile: the step of a weight as one loop (C kernel / torch.compile) -----------


@pytest.mark.parametrize("backend", ["native", "compile"])
@pytest.mark.parametrize("spec,shape", [
    ("mlp:24,24,24", 20),
    ("C(6,3,1,1)-P(2,2,0,max)-C(8,3,1,1)-P(4,4,0,avg)", (2, 8, 8)),
])
def test_one_loop_step_same_iterates_as_sgd_plus_projection(spec, shape, backend) -> None:
    """Both layer paths (batch < and >= in_features), the conv filters' projection, gamma,
    beta, the output layer, and a learning rate halved mid-run (compile: without a
    recompile)."""
    import torch._dynamo.utils

    torch.manual_seed(0)
    ref = build_model(spec, shape, 5, data_norm="running").double()
    project_weights_(ref)
    fused = copy.deepcopy(ref)
    ref_opt = paper_optimizer(ref, lr=0.05, weight_decay=5e-3)
    opt = ProjectedSGD(fused, lr=0.05, weight_decay=5e-3, backend=backend)
    assert opt.backend == backend
    full = (shape,) if isinstance(shape, int) else shape
    g = torch.Generator().manual_seed(1)
    graphs = None
    for step, batch in enumerate([1, 8, 30, 1, 64, 8, 2, 30, 16, 1] * 2):
        if step == 10:  # the paper halves the learning rate on a schedule
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            for o in (ref_opt, opt):
                for group in o.param_groups:
                    group["lr"] /= 2
        x = torch.randn(batch, *full, dtype=torch.float64, generator=g) * 2 + 0.5
        y = torch.randint(0, 5, (batch,), generator=g)
        a = train_step(ref, ref_opt, x, y)
        b = train_step(fused, opt, x, y, project=False)
        assert abs(a.loss - b.loss) < 1e-9 * max(1.0, abs(a.loss)), step
        assert torch.allclose(a.output, b.output, atol=1e-9), step
    if backend == "compile":  # no recompile
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    _assert_same_point(ref, fused)
    # weight.grad held the backward's product, not the gradient; detach() hands back the
    # plain backward, whose gradients match autograd through eq. 9 again.
    opt.detach()
    x = torch.randn(7, *full, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (7,), generator=g)
    ref.zero_grad()
    fused.zero_grad()
    torch.nn.functional.cross_entropy(ref(x), y).backward()
    torch.nn.functional.cross_entropy(fused(x), y).backward()
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-9), name


def test_compiled_step_falls_back_to_eager_with_a_warning(monkeypatch) -> None:
    """No C++ compiler (say): the step warns once, finishes that step eagerly and goes on as
    the eager ProjectedSGD -- the same iterates throughout."""
    import normprop.fused_sgd as fused_sgd

    def no_compiler(fn, **kwargs):
        def fails(*args):
            raise RuntimeError("no working C++ compiler found")
        return fails

    monkeypatch.setattr(fused_sgd.torch, "compile", no_compiler)
    ref, ref_opt, net, opt, x, y = _twins(backend="compile")
    with pytest.warns(RuntimeWarning, match="could not compile.*no working C\\+\\+ compiler"):
        train_step(net, opt, x, y, project=False)
    train_step(ref, ref_opt, x, y)
    assert opt.backend == "eager" and not any(m.fused_link.raw for m in opt.fused_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        for _ in range(3):
            a, b = train_step(ref, ref_opt, x, y), train_step(net, opt, x, y, project=False)
            assert abs(a.loss - b.loss) < 1e-12


def test_compiled_step_refuses_per_group_learning_rates() -> None:
    net = build_model("mlp:8", 4, 2)
    opt = ProjectedSGD(net, lr=0.1, backend="compile")
    opt.param_groups[0]["lr"] = 0.05
    net(torch.randn(2, 4)).sum().backward()
    with pytest.raises(ValueError, match="one lr and momentum"):
        opt.step()


def test_foreach_step_same_iterates_as_the_per_tensor_step() -> None:
    """``foreach=True`` (the default off the CPU) takes the same steps as the per-tensor loop."""
    torch.manual_seed(0)
    a = build_model("C(4,3,1,1)-P(2,2,0,max)-C(6,3,1,1)-P(4,4,0,avg)", (2, 8, 8), 4).double()
    b = copy.deepcopy(a)
    opt_a = ProjectedSGD(a, lr=0.05, backend="eager", foreach=False)
    opt_b = ProjectedSGD(b, lr=0.05, backend="eager", foreach=True)
    g = torch.Generator().manual_seed(2)
    for batch in [1, 8, 3, 8, 1, 5]:
        x = torch.randn(batch, 2, 8, 8, dtype=torch.float64, generator=g)
        y = torch.randint(0, 4, (batch,), generator=g)
        la = train_step(a, opt_a, x, y, project=False).loss
        lb = train_step(b, opt_b, x, y, project=False).loss
        assert abs(la - lb) < 1e-12
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["native", "compile"])
def test_zero_grad_drops_a_one_loop_backwards_tangent(backend) -> None:
    """train_step skips a step whose gradient is not finite by zeroing the gradients; the
    tangent coefficients of that backward go with them, so the next step is not poisoned."""
    ref, ref_opt, net, opt, x, y = _twins(backend=backend)
    torch.nn.functional.cross_entropy(net(x * 1e3), y).backward()  # a step not taken
    assert all(m.fused_link.tangent is not None for m in opt.fused_layers)
    opt.zero_grad()
    assert all(m.fused_link.tangent is None for m in opt.fused_layers)
    for _ in range(3):
        a, b = train_step(ref, ref_opt, x, y), train_step(net, opt, x, y, project=False)
        assert abs(a.loss - b.loss) < 1e-12


@pytest.mark.parametrize("backend", ["eager", "native", "compile"])
def test_a_zero_gamma_takes_the_kept_product_path_with_the_same_iterates(backend) -> None:
    """gamma_i = 0 makes the backward keep W . x (the path a GPU always takes); ProjectedSGD's
    directions are unchanged by it."""
    torch.manual_seed(0)
    ref = build_model("mlp:12,12", 6, 3).double()
    with torch.no_grad():
        ref.layers[0].gamma[2] = 0.0
        ref.layers[1].gamma[5] = 0.0
    project_weights_(ref)
    net = copy.deepcopy(ref)
    ref_opt = paper_optimizer(ref, lr=0.1)
    opt = ProjectedSGD(net, lr=0.1, backend=backend)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    assert net.layers[0](net.data_norm(x)).grad_fn.via_out is False
    for _ in range(3):
        a, b = train_step(ref, ref_opt, x, y), train_step(net, opt, x, y, project=False)
        assert abs(a.loss - b.loss) < 1e-12
    for name, d in _directions(ref).items():
        assert torch.allclose(_directions(net)[name], d, atol=1e-12), name


@pytest.mark.parametrize("backend", ["eager", "native", "compile"])
def test_a_dropped_optimiser_gives_the_layers_back(backend) -> None:
    """Without detach(): once ProjectedSGD is garbage, weight.grad is the gradient again (a
    different optimiser can take over) and the net computes the same function."""
    import gc

    torch.manual_seed(0)
    net = build_model("mlp:12,12", 6, 3).double()
    opt = ProjectedSGD(net, lr=0.3, backend=backend)
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    for _ in range(3):
        train_step(net, opt, x, y, project=False)
    layers = opt.fused_layers
    del opt
    gc.collect()
    net(x)  # the first forward after the optimiser is gone lets go of it
    assert all(m.fused_link is None for m in layers)
    _assert_plain_gradients(net, layers, x, y)

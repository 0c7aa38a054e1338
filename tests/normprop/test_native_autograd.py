"""NormPropLinear's C++ autograd node (``normprop.native_autograd``) under ProjectedSGD's native
backend: the same iterates as the Python node bit for bit, the same guarantees (first
derivatives only, in-place edits detected, ``zero_grad``), and the Python node wherever the
C++ one cannot be built or cannot take the layer."""

from __future__ import annotations

import copy
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from normprop import ProjectedSGD, build_model, native, native_autograd, train_step

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler for the kernels")


def _node_names(out: torch.Tensor) -> list[str]:
    seen, todo, names = set(), [out.grad_fn], []
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(fn.name())
        todo.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


def _cpp_nodes(out: torch.Tensor) -> int:
    return sum("CppNode" in n and "LinearRows" in n for n in _node_names(out))


def _python_nodes(out: torch.Tensor) -> int:
    return sum(n == "_NormPropLinearRowsBackward" for n in _node_names(out))


@pytest.fixture
def cpp_switch(monkeypatch):
    """``switch["cpp"] = False`` makes the layers take the Python node."""
    assert native_autograd.available(), native_autograd.unavailable_reason()
    real, switch = native_autograd.linear_rows, {"cpp": True}
    monkeypatch.setattr(native_autograd, "linear_rows", lambda: real() if switch["cpp"] else None)
    return switch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 12), (5, 12)])
def test_the_cpp_node_takes_the_python_nodes_steps_bit_for_bit(dtype, shape, cpp_switch) -> None:
    """Twin nets, one per node, two backwards per step (the tangent accumulates), four steps:
    losses, every gradient, the tangent coefficients and the weights agree exactly."""
    torch.manual_seed(0)
    nets = [build_model("mlp:16,16", 12, 3).to(dtype)]
    nets.append(copy.deepcopy(nets[0]))
    opts = [ProjectedSGD(net, lr=0.1, weight_decay=1e-3, backend="native") for net in nets]
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        xs = [torch.randn(*shape, dtype=dtype, generator=g) for _ in range(2)]
        ys = [torch.randint(0, 3, shape[:1], generator=g) for _ in range(2)]
        seen = []
        for use_cpp, net, opt in zip((True, False), nets, opts):
            cpp_switch["cpp"] = use_cpp
            opt.zero_grad()
            losses = []
            for x, y in zip(xs, ys):
                x = x.clone().requires_grad_()
                out = net(x)
                assert (_cpp_nodes(out), _python_nodes(out)) == ((3, 0) if use_cpp else (0, 3))
                loss = torch.nn.functional.cross_entropy(out, y)
                loss.backward()
                losses.append(loss.detach())
            seen.append(losses + [x.grad] + [p.grad.clone() for p in net.parameters()]
                        + [m.fused_link.tangent.clone() for m in opt.fused_layers])
            opt.step()
        for a, b in zip(*seen):
            assert torch.equal(a, b)
        for p, q in zip(*(net.parameters() for net in nets)):
            assert torch.equal(p, q)


def test_differentiating_twice_is_a_clear_error() -> None:
    """``create_graph=True`` still gives the first derivatives; differentiating them again
    raises (as the Python node's ``once_differentiable`` does) instead of returning second
    derivatives that miss the C kernel's part."""
    torch.manual_seed(0)
    net = build_model("mlp:8", 6, 3).double()
    opt = ProjectedSGD(net, lr=0.1, backend="native")  # noqa: F841 (kept: it drives the layers)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    layer = net.layers[0]

    def loss() -> torch.Tensor:
        out = net(x)
        assert _cpp_nodes(out) == 2
        return torch.nn.functional.cross_entropy(out, y)

    plain = torch.autograd.grad(loss(), [x, layer.gamma])
    twice = torch.autograd.grad(loss(), [x, layer.gamma], create_graph=True)
    for a, b in zip(plain, twice):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        twice[0].pow(2).sum().backward()


def test_an_inplace_edit_between_forward_and_backward_is_detected() -> None:
    net = build_model("mlp:8", 6, 3)
    opt = ProjectedSGD(net, lr=0.1, backend="native")  # noqa: F841 (kept: it drives the layers)
    out = net(torch.randn(4, 6))
    assert _cpp_nodes(out) == 2
    loss = out.sum()
    with torch.no_grad():
        net.layers[0].weight.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_zero_grad_drops_the_tangent_the_cpp_node_left() -> None:
    net = build_model("mlp:8", 6, 3)
    opt = ProjectedSGD(net, lr=0.1, backend="native")
    net(torch.randn(4, 6)).sum().backward()
    link = opt.fused_layers[0].fused_link
    assert link.probe.grad is not None
    opt.zero_grad()
    assert link.probe.grad is None and link.tangent is None


def test_layers_it_cannot_take_keep_the_python_node() -> None:
    """A zero gamma_i (u is then not read from the output) and the eager backend (no raw
    product) take the Python node; the iterates are tested against
    SGD + projection in test_fused_sgd for every such case."""
    torch.manual_seed(0)
    net = build_model("mlp:8,8", 6, 3)
    with torch.no_grad():
        net.layers[1].gamma[3] = 0.0
    opt = ProjectedSGD(net, lr=0.1, backend="native")  # noqa: F841 (kept: it drives the layers)
    out = net(torch.randn(4, 6))
    assert (_cpp_nodes(out), _python_nodes(out)) == (2, 1)
    eager = build_model("mlp:8,8", 6, 3)
    eager_opt = ProjectedSGD(eager, lr=0.1, backend="eager")  # noqa: F841
    assert _cpp_nodes(eager(torch.randn(4, 6))) == 0


@pytest.fixture
def fresh_node(monkeypatch, tmp_path):
    """No C++ node resolved in this process yet, and an empty cache directory."""
    monkeypatch.setenv("NORMPROP_CACHE_DIR", str(tmp_path / "cache"))
    native._library.cache_clear()
    native_autograd._op.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    native._library.cache_clear()
    native_autograd._op.cache_clear()


@pytest.mark.parametrize("env,reason", [
    ({"CXX": "/nonexistent/c++"}, "no C\\+\\+ compiler"),
    ({"NORMPROP_NATIVE_AUTOGRAD": "0"}, "NORMPROP_NATIVE_AUTOGRAD=0"),
])
def test_without_the_cpp_node_the_layers_train_on_the_python_node(fresh_node, monkeypatch, env,
                                                                 reason) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert not native_autograd.available()
    assert reason.replace("\\", "") in native_autograd.unavailable_reason()
    net = build_model("mlp:8", 6, 3)
    opt = ProjectedSGD(net, lr=0.1)
    assert opt.backend == "native"  # the C kernels are there
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    assert _python_nodes(net(x)) == 2
    before = net.layers[0].weight.detach().clone()
    train_step(net, opt, x, y, project=False)
    assert not torch.equal(before, net.layers[0].weight)


_CHILD = textwrap.dedent("""
    import torch
    from normprop import ProjectedSGD, build_model, native_autograd
    assert native_autograd.available(), native_autograd.unavailable_reason()
    net = build_model("mlp:8", 6, 3)
    ProjectedSGD(net, lr=0.1)
    print(net(torch.randn(4, 6)).grad_fn.name())
""")


def test_the_node_is_built_once_then_loaded_by_new_processes(tmp_path) -> None:
    """A new machine (an empty cache directory) builds the node with the C++ compiler; the
    next process loads that build and runs no compiler."""
    log = tmp_path / "cxx.log"
    wrapper = tmp_path / "cxx-logged"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec c++ "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "CXX": str(wrapper), "NORMPROP_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("NORMPROP_NATIVE_AUTOGRAD", None)
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                              text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr
        assert "LinearRows" in proc.stdout
    [build] = log.read_text().splitlines()  # one build, by the first process
    assert "linear_rows.cpp" in build and "-std=c++20" in build
    assert len(list((tmp_path / "cache").glob("linear_rows-*.so"))) == 1


def test_the_paired_benchmark_runs_and_prints_every_ratio() -> None:
    """``benchmarks/bench_vs_batchnorm.py`` at a toy size: every variant timed, every ratio
    with its interval and verdict (the figures in docs/LIBRARY.md come from it)."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks",
                          "bench_vs_batchnorm.py")
    proc = subprocess.run([sys.executable, script, "--batches", "4", "--rounds", "4",
                           "--warmup", "1"], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for variant in ("plain", "batchnorm", "normprop", "normprop+c++"):
        assert f"\n  {variant} " in proc.stdout
    ratios = [line for line in proc.stdout.splitlines() if " / " in line]
    assert len(ratios) == 6
    assert all(("faster" in r) or ("slower" in r) or ("not distinguishable" in r)
               for r in ratios)

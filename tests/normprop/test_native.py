"""The native ProjectedSGD step (normprop/csrc/projected_sgd.c): what it computes, how it is
built and cached, and what happens where it cannot be built.

The kernel is compared with ``_fused_update`` -- the same step in torch ops -- on the same
tensors; ``tests/normprop/test_fused_sgd.py`` compares its iterates with torch SGD + projection.
"""

from __future__ import annotations

import copy
import os
import re
import stat

import pytest
import torch

from normprop import (
    build_model,
    native,
    native_autograd,
    paper_optimizer,
    project_weights_,
    train_step,
)
from normprop.fused_sgd import ProjectedSGD, _fused_update


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A cache directory of its own and no loaded library: the next call builds (or fails to)
    from scratch. The process-wide library is loaded again afterwards."""
    monkeypatch.setenv("NORMPROP_CACHE_DIR", str(tmp_path / "cache"))
    native._library.cache_clear()
    yield tmp_path
    monkeypatch.undo()
    native._library.cache_clear()


def _step_tensors(m: int, n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(m, n, dtype=dtype, generator=g)
    raw = torch.randn(m, n, dtype=dtype, generator=g) * 0.1
    buf = torch.randn(m, n, dtype=dtype, generator=g) * 0.01
    norms = v.norm(dim=1)
    tangent = torch.randn(m, dtype=dtype, generator=g) * 1e-2
    return v, raw, buf, norms, tangent


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_kernel_rounds_as_the_torch_formula(dtype, momentum) -> None:
    """Weight and momentum bit for bit as ``_fused_update`` in torch ops; the new row norms
    (summed in another order) to a few ulps."""
    v, raw, buf, norms, tangent = _step_tensors(37, 300, dtype)
    v2, buf2 = v.clone(), buf.clone()
    lr, lam = 0.05, 5e-3
    if momentum == 0.0:
        buf2.zero_()  # torch ops: b = 0 b + d = d; the kernel keeps no buffer (b = None)
    # The scalars as tensors, as the compile backend passes them (a Python float over a tensor
    # is reciprocal-then-multiply in torch, which rounds differently from a division).
    scalars = [torch.tensor(s, dtype=dtype) for s in (lr, momentum, lam)]
    _fused_update([v2], [raw], [buf2], [norms], [tangent], [], [], [], [], *scalars)
    rows, _ = native.projected_sgd_rows_(v, raw, buf if momentum else None, norms, tangent,
                                         lr, momentum, lam)
    assert rows.shape == (1, 37)
    assert torch.equal(v, v2)
    if momentum:
        assert torch.equal(buf, buf2)
    eps = torch.finfo(dtype).eps
    assert torch.allclose(rows[0], v.norm(dim=1), rtol=16 * eps, atol=0)
    assert not torch.equal(v, _step_tensors(37, 300, dtype)[0])  # it did move


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("consts", [(1e-12, 1.7, 0.4), (1e-6, 1.0, 0.0)])
def test_kernel_gives_the_next_forwards_constants_as_the_layer_computes_them(dtype,
                                                                            consts) -> None:
    """``r = n + eps``, ``k = gamma / r * inv_c1``, ``shift = (beta - c2) inv_c1`` from the
    new norms, bit for bit as ``_NormPropLinearRows.forward`` computes them in torch ops (ReLU's
    constants, and an activation without them); the flag says whether a gamma is zero."""
    v, raw, buf, norms, tangent = _step_tensors(37, 300, dtype)
    g = torch.Generator().manual_seed(4)
    gamma, beta = torch.rand(37, dtype=dtype, generator=g) + 0.5, torch.randn(37, dtype=dtype)
    eps, inv_c1, c2 = consts
    rows, nonzero = native.projected_sgd_rows_(v, raw, buf, norms, tangent, 0.05, 0.9, 5e-3,
                                               (gamma, beta, eps, inv_c1, c2))
    assert nonzero
    r = rows[0] + eps
    k = torch.div(gamma, r)
    if inv_c1 != 1.0:
        k.mul_(inv_c1)
    shift = beta if inv_c1 == 1.0 and c2 == 0.0 else torch.sub(beta, c2).mul_(inv_c1)
    assert torch.equal(rows[1], r) and torch.equal(rows[2], k) and torch.equal(rows[3], shift)
    gamma[17] = 0.0
    assert not native.projected_sgd_rows_(v, raw, buf, norms, tangent, 0.05, 0.9, 5e-3,
                                          (gamma, beta, eps, inv_c1, c2))[1]


@pytest.mark.parametrize("spoil", ["transposed", "float16", "short buffer", "short norms",
                                   "short gamma", "vector"])
def test_kernel_refuses_what_it_cannot_take_and_touches_nothing(spoil) -> None:
    """The C code trusts its pointers, so the public call checks layout, dtype and shapes
    first and raises before writing anything."""
    v, raw, buf, norms, tangent = _step_tensors(6, 5, torch.float32)
    gamma, beta = torch.ones(6), torch.zeros(6)
    if spoil == "transposed":
        raw = raw.t().contiguous().t()
    elif spoil == "float16":
        buf = buf.half()
    elif spoil == "short buffer":
        buf = buf[:5]
    elif spoil == "short norms":
        norms = norms[:5]
    elif spoil == "short gamma":
        gamma = gamma[:5]
    else:
        v, raw, buf = v[0], raw[0], buf[0]
    before = v.clone()
    with pytest.raises(ValueError, match="projected_sgd_rows_"):
        native.projected_sgd_rows_(v, raw, buf, norms, tangent, 0.1, 0.9, 0.0,
                                   (gamma, beta, 1e-12, 1.0, 0.0))
    assert torch.equal(v, before)


def test_kernel_result_does_not_depend_on_the_thread_count() -> None:
    """Rows are split over threads, each row summed by one thread in a fixed order."""
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            v, raw, buf, norms, tangent = _step_tensors(512, 256, torch.float32, seed=3)
            assert v.numel() >= native._PARALLEL_MIN  # large enough to be split
            gamma, beta = torch.ones(512), torch.zeros(512)
            out, _ = native.projected_sgd_rows_(v, raw, buf, norms, tangent, 0.1, 0.9, 5e-4,
                                                (gamma, beta, 1e-12, 1.7, 0.4))
            results.append((v, buf, out))
    finally:
        torch.set_num_threads(before)
    for v, buf, out in results[1:]:
        assert torch.equal(v, results[0][0]) and torch.equal(buf, results[0][1])
        assert torch.equal(out, results[0][2])


def test_kernel_write_counts_as_an_in_place_change() -> None:
    """The C write goes around autograd, so the kernel bumps the version counter itself:
    the layer's "rows are unit" mark is void afterwards, and a graph that saved the weight
    refuses to backward through the stale value (as after any in-place op)."""
    torch.manual_seed(0)
    net = build_model("mlp:16", 8, 3)
    layer = net.layers[0]
    assert layer.rows_known_unit()
    v = layer.weight
    loss = net(torch.randn(4, 8)).sum()  # a graph holding the weight, not yet differentiated
    version = v._version
    with torch.no_grad():
        native.projected_sgd_rows_(v, torch.randn_like(v), None, v.norm(dim=1),
                                   torch.zeros(16), 0.1, 0.0, 0.0)
    assert v._version == version + 1
    assert not layer.rows_known_unit()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_auto_takes_the_native_step_on_the_cpu() -> None:
    net = build_model("mlp:8", 4, 2)
    assert native.available() and native.unavailable_reason() is None
    assert ProjectedSGD(net, lr=0.1).backend == "native"
    assert ProjectedSGD(net, lr=0.1, backend="eager").backend == "eager"
    with pytest.raises(ValueError, match="one of 'auto', 'eager', 'native', 'compile'"):
        ProjectedSGD(net, lr=0.1, backend="fast")


def test_the_build_is_cached_across_processes(fresh_build, monkeypatch) -> None:
    """The first use compiles into the cache directory; a new process (here: a cleared
    in-process cache) loads that file and runs no compiler."""
    log = fresh_build / "cc.log"
    wrapper = fresh_build / "cc-logged"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec cc "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(wrapper))
    assert native.available()
    builds = log.read_text().splitlines()
    assert len(builds) == 1 and "-fopenmp" in builds[0]
    [built] = (fresh_build / "cache").glob("projected_sgd-*.so")
    native._library.cache_clear()
    assert native.available()
    assert log.read_text().splitlines() == builds  # loaded, not rebuilt
    assert list((fresh_build / "cache").iterdir()) == [built]  # no temporary files left


def test_a_compiler_that_cannot_build_the_isa_clones_gets_the_plain_build(fresh_build,
                                                                         monkeypatch) -> None:
    """A platform without ifunc (musl, say) fails on the AVX2/AVX-512 clones: the loader then
    builds without them instead of giving up on the kernel."""
    log = fresh_build / "cc.log"
    wrapper = fresh_build / "cc-no-ifunc"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\n'
                       'case "$*" in *PSGD_NO_CLONES*) exec cc "$@";; esac\n'
                       'echo "error: the call requires ifunc" >&2; exit 1\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(wrapper))
    assert native.available()
    builds = log.read_text().splitlines()
    assert len(builds) == 2 and "-DPSGD_NO_CLONES" in builds[1] and "-fopenmp" in builds[1]
    v, raw, buf, norms, tangent = _step_tensors(5, 7, torch.float64)
    rows, _ = native.projected_sgd_rows_(v, raw, buf, norms, tangent, 0.1, 0.9, 0.0)
    assert torch.allclose(rows[0], v.norm(dim=1), rtol=1e-14, atol=0)


def test_torch_on_intel_openmp_gets_a_serial_kernel(fresh_build, monkeypatch) -> None:
    """Where torch runs on libiomp5 (conda builds), a libgomp-linked kernel would bring a second
    OpenMP runtime into the process: the loader builds the kernel without OpenMP there."""
    log = fresh_build / "cc.log"
    wrapper = fresh_build / "cc-logged"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec cc "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setattr(native, "_openmp_runtime_clash", lambda: True)
    assert native.available()
    [build] = log.read_text().splitlines()
    assert "-fopenmp" not in build and "-DPSGD_NO_CLONES" not in build


def test_a_library_in_the_cache_needs_no_compiler(fresh_build, monkeypatch) -> None:
    """An image can ship the built library in its cache directory and no compiler."""
    monkeypatch.delenv("CC", raising=False)
    assert native.available()  # built here with cc
    native._library.cache_clear()
    monkeypatch.setenv("PATH", str(fresh_build / "empty"))  # no cc on the PATH now
    assert native.available()
    native._library.cache_clear()
    for built in (fresh_build / "cache").glob("*.so"):
        built.unlink()
    assert not native.available() and "no C compiler" in native.unavailable_reason()


def test_an_unusable_cache_directory_falls_back_to_a_private_temp_dir(fresh_build,
                                                                      monkeypatch) -> None:
    not_a_dir = fresh_build / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv("NORMPROP_CACHE_DIR", str(not_a_dir))
    monkeypatch.setenv("TMPDIR", str(fresh_build / "tmp"))
    (fresh_build / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    assert native.available()
    private = fresh_build / "tmp" / f"normprop-{os.getuid()}"
    assert list(private.glob("projected_sgd-*.so"))
    assert stat.S_IMODE(private.stat().st_mode) == 0o700


@pytest.mark.parametrize("cc,reason", [
    ("/nonexistent/cc", "no C compiler"),
    ("FAILING", "could not build the native step: .*boom"),
])
def test_without_a_working_compiler_auto_is_eager_and_native_says_why(
        fresh_build, monkeypatch, cc, reason) -> None:
    """No compiler, or one that fails: ``available()`` is False with the reason, ``auto``
    takes the eager step (the same iterates, see test_fused_sgd), and asking for ``native``
    raises with the reason rather than running something else."""
    if cc == "FAILING":
        failing = fresh_build / "cc-failing"
        failing.write_text("#!/bin/sh\necho boom >&2\nexit 1\n")
        failing.chmod(failing.stat().st_mode | stat.S_IEXEC)
        cc = str(failing)
    monkeypatch.setenv("CC", cc)
    assert not native.available()
    assert re.search(reason, native.unavailable_reason())
    net = build_model("mlp:8", 4, 2)
    opt = ProjectedSGD(net, lr=0.1)
    assert opt.backend == "eager"
    train_step(net, opt, torch.randn(3, 4), torch.tensor([0, 1, 0]), project=False)
    with pytest.raises(RuntimeError, match=reason):
        ProjectedSGD(net, lr=0.1, backend="native")
    with pytest.raises(RuntimeError, match="not available"):
        native.projected_sgd_rows_(*_step_tensors(2, 3, torch.float32), 0.1, 0.9, 0.0)
    assert not list(fresh_build.rglob("*.so"))  # nothing half-built left behind


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_weights_the_kernel_cannot_take_get_the_same_step_in_torch_ops(momentum,
                                                                       monkeypatch) -> None:
    """A weight outside the kernel's reach (a dtype other than float32/64, a non-contiguous
    one) takes ``_fused_update`` in torch ops: the same iterates as SGD + projection."""
    torch.manual_seed(0)
    ref = build_model("mlp:12,12", 6, 3).double()
    project_weights_(ref)
    net = copy.deepcopy(ref)
    ref_opt = paper_optimizer(ref, lr=0.1, momentum=momentum)
    opt = ProjectedSGD(net, lr=0.1, momentum=momentum, backend="native")
    kernel_calls = []
    monkeypatch.setattr(native, "supports", lambda *t: False)
    monkeypatch.setattr(native, "_rows_unchecked", lambda *a: kernel_calls.append(a))
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    for _ in range(4):
        a, b = train_step(ref, ref_opt, x, y), train_step(net, opt, x, y, project=False)
        assert abs(a.loss - b.loss) < 1e-12
    assert not kernel_calls
    for r, m in zip(ref.layers, net.layers):
        w = m.weight.detach()
        assert torch.allclose(w / w.norm(dim=1, keepdim=True), r.weight, atol=1e-12)
    assert all(m.fused_link.next_norms is not None for m in opt.fused_layers)


@pytest.mark.parametrize("node", ["python", "c++"])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_the_native_layer_backward_gives_the_torch_op_gradients(dtype, atol, activation, node,
                                                                monkeypatch) -> None:
    """Under the native backend the layer's backward runs its activation-sized part in C
    (the ReLU mask, g k, the sums), from the Python autograd node or the C++ one
    (``native_autograd``): every gradient -- input, product, gamma, beta -- and the tangent
    coefficients equal those of the torch-op backward, step after step."""
    torch.manual_seed(0)
    nets = [build_model("mlp:16,16", 12, 3, activation=activation).to(dtype) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [ProjectedSGD(net, lr=0.1, backend="native") for net in nets]
    for m in opts[1].fused_layers:
        m.fused_link.native = False  # the same raw-mode backward, in torch ops
    calls = []
    layer_backward = native._layer_backward
    monkeypatch.setattr(native, "_layer_backward",
                        lambda *a: calls.append(1) or layer_backward(*a))
    if node == "python":
        monkeypatch.setattr(native_autograd, "linear_rows", lambda: None)
    else:
        assert native_autograd.available(), native_autograd.unavailable_reason()
        # The output layer's node (tests/normprop/test_native_autograd.py checks every layer's).
        out = nets[0](torch.randn(5, 12, dtype=dtype))
        assert out.grad_fn.name().startswith("torch::autograd::CppNode")
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(5, 12, dtype=dtype, generator=g)
        y = torch.randint(0, 3, (5,), generator=g)
        seen = []
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            xi = x.clone().requires_grad_()
            torch.nn.functional.cross_entropy(net(xi), y).backward()
            seen.append([xi.grad] + [p.grad.clone() for p in net.parameters()]
                        + [m.fused_link.tangent.clone() for m in opt.fused_layers])
            opt.step()
        for a, b in zip(*seen):
            assert torch.allclose(a, b, rtol=atol, atol=atol)
    assert len(calls) == (3 * len(opts[0].fused_layers) if node == "python" else 0)


def test_the_layer_backward_does_not_depend_on_the_thread_count() -> None:
    """Columns are split over threads; each column's sums run over the batch in order."""
    g = torch.Generator().manual_seed(5)
    rows, m = 128, 1024  # large enough to be split
    grad, out = torch.randn(rows, m, generator=g), torch.randn(rows, m, generator=g)
    k, shift, r = torch.rand(m, generator=g) + 0.5, torch.randn(m, generator=g), torch.rand(m) + 1
    gamma = torch.rand(m, generator=g) + 0.5
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(native._layer_backward(grad, out, k, shift, gamma, r, -0.2, 1.7))
    finally:
        torch.set_num_threads(before)
    for gz, stats in results[1:]:
        assert torch.equal(gz, results[0][0]) and torch.equal(stats, results[0][1])
    # and they are the sums they claim to be
    masked = torch.where(out <= -0.2, torch.zeros_like(grad), grad)
    gz, stats = results[0]
    assert torch.allclose(gz, masked * k, rtol=1e-6, atol=1e-6)
    u = (masked * out).sum(0) - shift * masked.sum(0)
    assert torch.allclose(stats[0], u / gamma, rtol=1e-4, atol=1e-3)
    assert torch.allclose(stats[1], u / r, rtol=1e-4, atol=1e-3)
    assert torch.allclose(stats[2], masked.sum(0) * 1.7, rtol=1e-4, atol=1e-3)

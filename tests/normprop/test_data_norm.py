"""Data normalisation (sections 3.1, 4.1, 4.5): the only place data statistics enter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normprop import DataNorm, safe_std
from normprop.data_norm import half_life_decay


@settings(max_examples=40, deadline=None)
@given(data=st.lists(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=3, max_size=3),
                     min_size=1, max_size=40),
       cuts=st.lists(st.integers(0, 40), max_size=6))
def test_batch_merge_equals_one_at_a_time_welford(data, cuts):
    x = torch.tensor(data, dtype=torch.float64)
    one, merged = DataNorm(3, mode="running"), DataNorm(3, mode="running")
    for row in x:
        one.update(row.unsqueeze(0))
    bounds = sorted({0, len(x), *[c for c in cuts if c <= len(x)]})
    for a, b in zip(bounds, bounds[1:]):
        merged.update(x[a:b])
    for name in ("count", "running_mean", "running_m2"):
        assert torch.allclose(getattr(one, name), getattr(merged, name), rtol=1e-9, atol=1e-6)
    assert torch.allclose(merged.running_mean, x.mean(0), rtol=1e-9, atol=1e-9)
    assert torch.allclose(merged.running_var, x.var(0, unbiased=False), rtol=1e-7, atol=1e-6)


def test_half_life_weighs_old_data_one_half():
    h = 50
    assert half_life_decay(h) ** h == pytest.approx(0.5)
    assert half_life_decay(None) == 1.0 and half_life_decay(math.inf) == 1.0
    with pytest.raises(ValueError, match="half_life must be positive"):
        half_life_decay(0)
    norm = DataNorm(1, mode="running", half_life=h)
    for _ in range(40 * h):  # effectively infinite history of 0
        norm.update(torch.zeros(1, 1))
    for _ in range(h):  # then one half-life of 10
        norm.update(torch.full((1, 1), 10.0))
    assert norm.running_mean.item() == pytest.approx(5.0, abs=1e-3)
    # Equivalent sample size of an exponential window: 1 / (1 - d).
    assert norm.count.item() == pytest.approx(1 / (1 - half_life_decay(h)), rel=1e-6)
    # Cumulative statistics would still be at 10 / 41.
    cumulative = DataNorm(1, mode="running")
    cumulative.update(torch.cat([torch.zeros(40 * h, 1), torch.full((h, 1), 10.0)]))
    assert cumulative.running_mean.item() == pytest.approx(10 / 41)


def test_half_life_tracks_a_drifting_stream_batchwise():
    g = torch.Generator().manual_seed(0)
    norm = DataNorm(2, mode="running", half_life=100)
    for _ in range(100):
        norm.update(torch.randn(20, 2, generator=g))
    for _ in range(50):  # 1000 samples = 10 half-lives after the shift
        norm.update(torch.randn(20, 2, generator=g) * 3 + 7)
    # The window holds ~1/(1-d) = 144 samples: mean within 4 standard errors (0.25 each); the
    # cumulative estimate would sit at 7/3.
    assert torch.allclose(norm.running_mean, torch.full((2,), 7.0, dtype=torch.float64), atol=1.0)
    assert torch.allclose(norm.running_std(), torch.full((2,), 3.0, dtype=torch.float64), atol=0.8)


def test_batch_size_one_first_samples_are_finite():
    norm = DataNorm(3, mode="batch").train()
    first = norm(torch.tensor([[1.0, -2.0, 5.0]]))
    assert torch.equal(first, torch.zeros(1, 3))  # no variance yet: centred only
    second = norm(torch.tensor([[3.0, -2.0, 1e6]]))
    assert torch.isfinite(second).all()
    assert second[0, 1].item() == 0.0  # a constant feature maps to 0, not 0/0
    assert second[0, 0].item() == pytest.approx(1.0)  # (3 - 2) / 1
    norm.eval()
    assert torch.isfinite(norm(torch.randn(5, 3))).all()
    assert torch.equal(safe_std(torch.tensor([4.0, 0.0, 4.0]), torch.tensor(1.0), 1e-8),
                       torch.ones(3))
    assert torch.equal(safe_std(torch.tensor([4.0, 0.0]), torch.tensor(2.0), 1e-8),
                       torch.tensor([2.0, 1.0]))


def test_batch_mode_uses_the_batch_and_keeps_running_estimates():
    torch.manual_seed(0)
    norm = DataNorm(4, mode="batch").train()
    x = torch.randn(64, 4) * torch.tensor([1.0, 2.0, 5.0, 0.1]) + 3
    out = norm(x)  # section 4.1: the batch's own statistics
    assert torch.allclose(out.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(out.std(0, unbiased=False), torch.ones(4), atol=1e-4)
    norm(torch.randn(64, 4) * torch.tensor([1.0, 2.0, 5.0, 0.1]) + 3)
    assert norm.count.item() == 128
    norm.eval()  # section 4.5: running estimates for validation and testing
    before = norm.count.clone()
    y = torch.randn(3, 4)
    mean, std = norm.mean_and_std()
    assert torch.allclose(norm(y), ((y - mean) / std).float(), atol=1e-6)
    assert torch.equal(norm.count, before)  # eval does not update


def test_per_channel_statistics_for_images():
    torch.manual_seed(0)
    x = torch.randn(10, 3, 5, 6) * torch.tensor([1.0, 4.0, 0.5]).view(1, 3, 1, 1) \
        + torch.tensor([0.0, -2.0, 9.0]).view(1, 3, 1, 1)
    norm = DataNorm(3, mode="running")
    norm.update(x)
    assert norm.count.item() == 10 * 5 * 6
    want_mean = x.double().mean(dim=(0, 2, 3))
    want_var = x.double().var(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(norm.running_mean, want_mean, atol=1e-10)
    assert torch.allclose(norm.running_var, want_var, atol=1e-8)
    out = DataNorm(3, mode="batch").train()(x)
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(out.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)
    # Batch size 1 of an image falls back to the running estimates (not instance norm).
    running = DataNorm(3, mode="batch").train()
    running.update(x)
    one = running(x[:1])
    mean, std = running.mean_and_std()
    assert torch.allclose(one, ((x[:1] - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).float(),
                          atol=1e-5)


def test_global_mode_fit_and_set_statistics():
    torch.manual_seed(0)
    data = torch.randn(500, 3) * torch.tensor([2.0, 0.5, 10.0]) - 1
    norm = DataNorm(3, mode="global").fit(data)
    np.testing.assert_allclose(norm.running_mean.numpy(), data.double().mean(0).numpy(), atol=1e-10)
    np.testing.assert_allclose(norm.running_std().numpy(),
                               data.double().std(0, unbiased=False).numpy(), rtol=1e-9)
    count = norm.count.clone()
    norm.train()(torch.randn(7, 3) * 100)  # global statistics are fixed while training
    assert torch.equal(norm.count, count)
    fixed = DataNorm(2, mode="global")
    fixed.set_statistics(torch.tensor([1.0, -1.0]), torch.tensor([2.0, 4.0]))
    x = torch.tensor([[3.0, 3.0], [1.0, -1.0]])
    assert torch.allclose(fixed(x), torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert torch.allclose(fixed.eval()(x), torch.tensor([[1.0, 1.0], [0.0, 0.0]]))


def test_none_mode_clip_and_bad_input():
    x = torch.randn(4, 2)
    assert torch.equal(DataNorm(2, mode="none")(x), x)
    clipped = DataNorm(1, mode="global", clip=2.0)
    clipped.set_statistics(torch.zeros(1), torch.ones(1))
    assert clipped(torch.tensor([[5.0], [-7.0], [1.5]])).flatten().tolist() == [2.0, -2.0, 1.5]
    with pytest.raises(ValueError, match="unknown data normalisation mode 'online'"):
        DataNorm(2, mode="online")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expects input of shape \(N, 2, ...\), got \(4, 3\)"):
        DataNorm(2)(torch.randn(4, 3))


def test_statistics_live_in_the_state_dict():
    norm = DataNorm(2, mode="running", half_life=10)
    norm.update(torch.randn(30, 2))
    clone = DataNorm(2, mode="running", half_life=10)
    clone.load_state_dict(norm.state_dict())
    x = torch.randn(3, 2)
    assert torch.equal(clone.eval()(x), norm.eval()(x))


def test_kept_running_statistics_follow_every_change():
    """The forward keeps the running (mean, std) in the input's dtype while the buffers are
    unchanged (global mode, evaluation); every way of changing them is seen."""
    norm = DataNorm(2, mode="running").eval()
    norm.update(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    x = torch.tensor([[2.0, 4.0]])

    def formula(inp: torch.Tensor = x) -> torch.Tensor:
        return (inp - norm.running_mean.to(inp.dtype)) / norm.running_std().to(inp.dtype)

    first = norm(x)
    assert torch.equal(first, formula()) and torch.equal(norm(x), first)
    norm.update(torch.tensor([[5.0, 0.0]]))
    assert torch.equal(norm(x), formula()) and not torch.equal(norm(x), first)
    norm.set_statistics(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0]))
    assert torch.equal(norm(x), torch.tensor([[1.0, 1.5]]))
    other = DataNorm(2, mode="running")
    other.update(torch.tensor([[0.0, 0.0], [4.0, 8.0]]))
    norm.load_state_dict(other.state_dict())
    assert torch.equal(norm(x), torch.tensor([[0.0, 0.0]]))
    with torch.no_grad():
        norm.running_mean.add_(1.0)
    assert torch.equal(norm(x), formula())
    norm.eps = 100.0  # every variance now below the floor: centred only
    assert torch.equal(norm(x), x - norm.running_mean.float())
    assert norm(x.double()).dtype == torch.float64
    assert torch.equal(norm(x.double()), formula(x.double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode,half_life,clip", [("running", None, None), ("batch", 5.0, 2.0)])
def test_one_sample_training_step_matches_the_torch_ops(dtype, mode, half_life, clip):
    """One sample on the CPU (the online worker's step) takes a NumPy path on the buffers' own
    memory; an input that needs a gradient takes torch ops. Statistics bit for bit, the output
    to an ulp, and the buffers' version counters move (the kept statistics see the change)."""
    fast = DataNorm(4, mode=mode, half_life=half_life, clip=clip)
    ref = DataNorm(4, mode=mode, half_life=half_life, clip=clip)
    g = torch.Generator().manual_seed(0)
    for i in range(60):
        x = (torch.randn(1, 4, generator=g) * 3 + 1).to(dtype)
        x[0, 3] = 7.0  # a constant feature: centred only, never divided by ~0
        version = fast.running_m2._version
        out = fast(x)
        want = ref(x.clone().requires_grad_()).detach()
        assert out.grad_fn is None and out.dtype == dtype and out.shape == (1, 4)
        assert fast.running_m2._version > version
        ulp = torch.finfo(dtype).eps
        assert torch.allclose(out, want, rtol=4 * ulp, atol=4 * ulp), i
        for name in ("running_mean", "running_m2", "count"):
            assert torch.equal(getattr(fast, name), getattr(ref, name)), (i, name)
    assert torch.isfinite(out).all() and out[0, 3] == 0
    fast.eval()
    x = torch.randn(3, 4, dtype=dtype, generator=g)
    assert torch.allclose(fast(x), ref.eval()(x), rtol=4 * ulp, atol=4 * ulp)


def test_a_net_made_and_run_under_inference_mode():
    """Inference tensors keep no version counter: the kept statistics, the one-sample path and
    the layers' known-unit-rows mark step aside, and the net computes what it computes outside."""
    from normprop import build_model, fold, project_weights_

    torch.manual_seed(0)
    x = torch.randn(5, 3)
    with torch.inference_mode():
        net = build_model("mlp:8", 3, 2, data_norm="running")
        for row in x:
            net(row.unsqueeze(0))  # training forwards: the running statistics move
        assert net.data_norm.count.item() == 5
        project_weights_(net)
        out = net.eval()(x)
        assert torch.allclose(fold(net)(x), out, atol=1e-6)
    plain = build_model("mlp:8", 3, 2, data_norm="running")
    plain.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), out, atol=1e-6)

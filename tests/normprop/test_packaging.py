"""What ``pip install`` puts on a user's machine: the library's C and C++ sources are built
there at first use, so the wheel must carry them (it did not, until this test: a wheel-installed
``ProjectedSGD`` on the CPU failed looking for the kernel's source)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None,
                    reason="setuptools is needed to build the wheel without a network")
def test_the_wheel_carries_every_source_the_library_builds(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [wheel] = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted((ROOT / "normprop" / "csrc").iterdir())
    assert {p.suffix for p in sources} == {".c", ".cpp"}
    for source in sources:
        assert f"normprop/csrc/{source.name}" in names
    assert "service/static/dashboard.html" in names


def test_a_missing_source_makes_the_native_code_unavailable_not_an_error(monkeypatch,
                                                                        tmp_path) -> None:
    """An install without the sources (an older wheel) trains on torch ops, saying why."""
    import torch

    from normprop import ProjectedSGD, build_model, native, native_autograd, train_step
    monkeypatch.setenv("NORMPROP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_SOURCE", tmp_path / "missing.c")
    monkeypatch.setattr(native_autograd, "_SOURCE", tmp_path / "missing.cpp")
    native._library.cache_clear()
    native_autograd._op.cache_clear()
    try:
        assert not native.available() and "is not installed" in native.unavailable_reason()
        assert not native_autograd.available()
        net = build_model("mlp:8", 6, 3)
        opt = ProjectedSGD(net, lr=0.1)
        assert opt.backend == "eager"
        train_step(net, opt, torch.randn(4, 6), torch.tensor([0, 1, 2, 0]), project=False)
    finally:
        monkeypatch.undo()
        native._library.cache_clear()
        native_autograd._op.cache_clear()

"""``NormPropLinear``'s autograd node in C++ under ProjectedSGD's native backend.

The source is ``csrc/linear_rows.cpp``.

Why C++: at the sizes the benchmarks and the online worker run, a NormProp layer's step is its
matmuls plus host time, and a Python ``autograd.Function`` is the dearest host time there is.
Between two large matmuls the caches are cold, and each entry into Python -- the engine calling
the node, unpacking seven saved tensors, a ``ctypes`` call, building the result tuple -- pays
for it: measured inside the 784-1024-1024-1024-10 MLP's step at batch 32, 60-110 us per layer
backward besides the matmuls and the elementwise pass (``benchmarks/bench_layers.py``,
docs/LIBRARY.md). BatchNorm's node is C++ and pays none of it. This node computes what
``layers._NormPropLinearRows`` computes on that path, with the same ops and the same C kernel
(bit for bit, tested), with no Python in the backward.

It is compiled against the installed torch on first use (about 15 s on a slow 2-core machine;
then cached, keyed by the source, the flags, the compiler and the torch build) and loaded with
``torch.ops.load_library``. Where it cannot be built -- no C++ compiler, no torch headers, an
unsupported platform -- or ``NORMPROP_NATIVE_AUTOGRAD=0``, the layer keeps the Python node:
the same numbers, more host time. So the tie to torch's C++ ABI is only ever to the torch that
is running.

Environment:
    ``CXX``: the C++ compiler (default ``c++``).
    ``NORMPROP_NATIVE_AUTOGRAD``: ``0`` keeps the Python node (for A/B measurements).
    ``NORMPROP_CACHE_DIR``: where the built library is kept (see :mod:`normprop.native`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from . import native

__all__ = ["available", "linear_rows", "unavailable_reason"]

_SOURCE = Path(__file__).with_name("csrc") / "linear_rows.cpp"
_ABI = 1
_NAMESPACE = "normprop_native"
_unavailable: str | None = None
_lock = threading.Lock()
log = logging.getLogger(__name__)

LinearRows = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                       float | None, float], Tensor]


def _torch_dir() -> Path:
    return Path(torch.__file__).resolve().parent


def _flags() -> tuple[str, ...]:
    """What ``torch.utils.cpp_extension`` would pass for a CPU extension with no Python
    bindings (the op registers itself with the dispatcher): C++20, torch's headers and
    libraries, its C++11-ABI setting."""
    root = _torch_dir()
    lib = root / "lib"
    return ("-O2", "-std=c++20", "-fPIC", "-shared", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DNORMPROP_PARALLEL_MIN={native._PARALLEL_MIN}",
            f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
            f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch", "-ltorch_cpu", "-lc10")


def _library_name(compiler: list[str], flags: tuple[str, ...]) -> str:
    key = hashlib.sha256(b"\0".join([
        _SOURCE.read_bytes(), " ".join(compiler).encode(), " ".join(flags).encode(),
        torch.__version__.encode(), str(torch.version.git_version).encode(),
        platform.machine().encode(), platform.system().encode()])).hexdigest()[:16]
    return f"linear_rows-{key}.so"


def _registered() -> bool:
    """Whether this process already has the op (loaded earlier, under any file name)."""
    try:
        return torch.ops.normprop_native.abi.default() == _ABI
    except (AttributeError, RuntimeError):
        return False


def _load(path: Path) -> bool:
    if not _registered():
        torch.ops.load_library(str(path))
        if not _registered():
            raise OSError(f"{path}: no normprop_native op of ABI {_ABI}")
    return True


def _find_or_build(compiler: list[str]) -> None:
    flags = _flags()
    name = _library_name(compiler, flags)
    if native._cached(name, opener=_load):
        return
    if shutil.which(compiler[0]) is None:
        raise FileNotFoundError(f"no C++ compiler ({shlex.join(compiler)!r} not found; set CXX)")
    if not (_torch_dir() / "include" / "torch" / "library.h").exists():
        raise FileNotFoundError("this torch install has no C++ headers")
    start = time.monotonic()
    log.info("building NormPropLinear's C++ autograd node (once per machine and torch build)")
    native._build_and_open(compiler, flags, name, opener=_load, source=_SOURCE, timeout=600)
    log.info("built in %.1f s", time.monotonic() - start)


@functools.cache
def _op() -> LinearRows | None:
    global _unavailable
    with _lock:
        if os.environ.get("NORMPROP_NATIVE_AUTOGRAD", "1") == "0":
            _unavailable = "NORMPROP_NATIVE_AUTOGRAD=0"
            return None
        if platform.system() != "Linux":
            _unavailable = "built for Linux only"
            return None
        lib = native._library()
        if lib is None:
            _unavailable = f"the native kernels are not available: {native._unavailable}"
            return None
        compiler = shlex.split(os.environ.get("CXX", "c++")) or ["c++"]
        if not _SOURCE.exists():
            _unavailable = f"the node's source {_SOURCE} is not installed"
            return None
        try:
            _find_or_build(compiler)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            _unavailable = f"could not build the C++ node: {exc}"
            return None
        kernels = native._backward_functions(lib)
        addresses = [ctypes.cast(kernels[dtype][0], ctypes.c_void_p).value
                     for dtype in (torch.float32, torch.float64)]
        torch.ops.normprop_native.set_kernels.default(*addresses)
        return torch.ops.normprop_native.linear_rows.default


def available() -> bool:
    """Whether the C++ node is built and loaded (builds it on first call, then cached)."""
    return _op() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is ``False`` (``None`` when it is ``True``)."""
    return None if available() else _unavailable


def linear_rows() -> LinearRows | None:
    """The op ``(x, weight, gamma, beta, probe, k, shift, r, floor, inv_c1) -> out``, or
    ``None`` where it is not available. ``probe`` receives the tangent coefficient ``u / r``
    as its gradient; the caller has checked the tensors (CPU, one float dtype, ``k``,
    ``shift``, ``gamma``, ``r`` contiguous, every ``gamma_i != 0``)."""
    return _op()

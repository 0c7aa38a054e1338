"""The native CPU kernels of :class:`~normprop.fused_sgd.ProjectedSGD`'s step (``csrc/``).

Why hand-written C: the step for a NormProp weight is one pass per row -- read the backward's
product, the momentum and the weight, write the momentum and the weight, and sum the new row's
squares for the next forward's ``||V_i||`` while the row is still in L1. Eager torch needs
three passes plus a norm read; ``torch.compile`` (inductor, torch 2.13 CPU) fuses the update
but not the row sum: with the sum inside, its kernel was 1.5x-1.7x slower than the update
alone, and the update plus a separate norm read costs ~1.6x this kernel
(``benchmarks/bench_layers.py``, docs/LIBRARY.md). The kernel is plain C99 with OpenMP (the
runtime torch itself loads), built once per machine with the system C compiler in under a
second and loaded through :mod:`ctypes`: no torch headers, so no ABI tie to a torch version,
and no build step at install time. Where it cannot be built (no compiler), ``ProjectedSGD``
takes the eager step, which computes the same iterates.

The same library carries the activation-sized part of ``NormPropLinear``'s backward while the
native step drives the layer (``_layer_backward``: the ReLU mask, ``g k`` and the sums for
``d gamma``, ``d beta`` and the tangent in one pass instead of nine torch ops), and the step
also hands the next forward its per-row constants of eq. 9: host time the layer's Python would
otherwise spend, which is what the worker's batch-1 step is made of.

Environment:
    ``NORMPROP_CACHE_DIR``: where the built library is kept (default
    ``$XDG_CACHE_HOME/normprop``, i.e. ``~/.cache/normprop``; a private directory under the
    system temp dir if that is not writable).
    ``CC``: the C compiler (default ``cc``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor

__all__ = ["available", "projected_sgd_rows_", "supports", "unavailable_reason"]

_SOURCE = Path(__file__).with_name("csrc") / "projected_sgd.c"
_ABI = 3
# -O3 vectorises the row loops; no -march=native, since a library cached in a shared home
# directory must run on every machine that reads it: on x86-64 the source asks GCC for AVX2 and
# AVX-512 clones of the kernel, picked when the library loads (the MLP benchmark's step: 1.40 ms
# with the SSE2 baseline alone, 1.09 ms with the clones on an AVX-512 machine; torch's
# SGD(fused=True) 1.14 ms). No -ffp-contract: each element rounds as torch's formula does.
_FLAGS = ("-O3", "-fPIC", "-shared", "-ffp-contract=off", "-std=c99")
_KERNELS = {torch.float32: ("normprop_psgd_rows_f32", ctypes.c_float),
            torch.float64: ("normprop_psgd_rows_f64", ctypes.c_double)}
_BACKWARD = {torch.float32: "normprop_layer_backward_f32", torch.float64: "normprop_layer_backward_f64"}
_unavailable: str | None = None


def _cache_dir() -> Path:
    env = os.environ.get("NORMPROP_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "normprop"


def _private_tmp_dir() -> Path:
    """``$TMPDIR/normprop-<uid>``, created 0700 and checked to be ours (a library loaded from a
    directory others can write to would run their code)."""
    path = Path(tempfile.gettempdir()) / f"normprop-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise OSError(f"{path} is not a private directory of this user")
    return path


class _CompileError(OSError):
    """The compiler ran and failed (another directory would not help)."""


def _build(compiler: list[str], flags: tuple[str, ...], target: Path,
           source: Path = _SOURCE, timeout: float = 120) -> None:
    """Compile to a temporary name next to ``target`` and rename: concurrent builders (two
    workers starting together) each write their own file, and readers only see whole ones."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*compiler, str(source), *flags, "-o", tmp],
                              capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise _CompileError(f"{shlex.join(compiler)} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _library_name(compiler: list[str], flags: tuple[str, ...]) -> str:
    key = hashlib.sha256(b"\0".join([
        _SOURCE.read_bytes(), " ".join(compiler).encode(), " ".join(flags).encode(),
        platform.machine().encode(), platform.system().encode()])).hexdigest()[:16]
    return f"projected_sgd-{key}.so"


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.normprop_psgd_abi() != _ABI:
        raise OSError(f"{path}: ABI {lib.normprop_psgd_abi()}, expected {_ABI}")
    for symbol, ctype in _KERNELS.values():
        fn = getattr(lib, symbol)
        fn.restype = ctypes.c_int
        fn.argtypes = ([ctypes.c_void_p] * 6 + [ctypes.c_int64] * 2 + [ctype] * 3
                       + [ctypes.c_void_p] * 2 + [ctype] * 3 + [ctypes.c_int])
    for dtype, symbol in _BACKWARD.items():
        fn = getattr(lib, symbol)
        fn.restype = None
        fn.argtypes = ([ctypes.c_void_p] * 8 + [ctypes.c_int64] * 2 + [ctypes.c_int]
                       + [_KERNELS[dtype][1]] * 2 + [ctypes.c_int])
    return lib


_Library = TypeVar("_Library")


def _cached(name: str, opener: Callable[[Path], _Library] = _open) -> _Library | None:
    """A library built earlier (by this machine, or shipped in an image's cache directory:
    then no compiler is needed), opened by ``opener``."""
    for directory in (_cache_dir, _private_tmp_dir):
        try:
            path = directory() / name
            if path.exists():
                return opener(path)
        except OSError:
            continue
    return None


def _build_and_open(compiler: list[str], flags: tuple[str, ...], name: str,
                    opener: Callable[[Path], _Library] = _open, source: Path = _SOURCE,
                    timeout: float = 120) -> _Library:
    """Build ``source`` into the cache directory (the private temp dir if that fails), then
    open it with ``opener``."""
    errors = []
    for directory in (_cache_dir, _private_tmp_dir):
        try:
            target = directory() / name
            _build(compiler, flags, target, source=source, timeout=timeout)
            return opener(target)
        except _CompileError:
            raise
        except (OSError, subprocess.SubprocessError) as exc:  # unwritable directory, timeout
            errors.append(str(exc))
    raise OSError("; ".join(errors))


# OpenMP threads where the compiler has them (torch's own runtime, libgomp, is then the one
# already loaded), serial otherwise; without the ISA clones where the platform cannot resolve
# them (no ifunc).
_OPENMP = ((*_FLAGS, "-fopenmp"), (*_FLAGS, "-fopenmp", "-DPSGD_NO_CLONES"))
_SERIAL = ((*_FLAGS, "-Wno-unknown-pragmas"),
           (*_FLAGS, "-Wno-unknown-pragmas", "-DPSGD_NO_CLONES"))


def _openmp_runtime_clash() -> bool:
    """Whether torch runs on Intel's OpenMP (some conda builds): a kernel linked to libgomp
    would load a second OpenMP runtime into the process, so it is built serial there."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "libiomp5" in maps and "libgomp" not in maps


@functools.cache
def _library() -> ctypes.CDLL | None:
    global _unavailable
    if platform.system() == "Windows":
        _unavailable = "the native step is built for POSIX systems only"
        return None
    compiler = shlex.split(os.environ.get("CC", "cc")) or ["cc"]
    variants = _SERIAL if _openmp_runtime_clash() else _OPENMP + _SERIAL
    if not _SOURCE.exists():
        _unavailable = f"the kernel's source {_SOURCE} is not installed"
        return None
    names = [_library_name(compiler, flags) for flags in variants]
    for name in names:
        lib = _cached(name)
        if lib is not None:
            return lib
    if shutil.which(compiler[0]) is None:
        _unavailable = f"no C compiler ({shlex.join(compiler)!r} not found; set CC)"
        return None
    errors = []
    for flags, name in zip(variants, names):
        try:
            return _build_and_open(compiler, flags, name)
        except OSError as exc:
            errors.append(str(exc))
    _unavailable = "could not build the native step: " + " | ".join(errors)
    return None


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on first call, < 1 s, then cached)."""
    return _library() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is ``False`` (``None`` when it is ``True``)."""
    return None if available() else _unavailable


def supports(*tensors: Tensor) -> bool:
    """Whether the kernel can take these tensors: CPU, contiguous, float32 or float64, one
    dtype. (Checked once per weight per step, so written for host time: ``is_cpu`` instead of
    ``device.type``.)"""
    dtype = tensors[0].dtype
    if dtype not in _KERNELS:
        return False
    for t in tensors:
        if t.dtype != dtype or not t.is_cpu or not t.is_contiguous():
            return False
    return True


# Below this many elements one thread does the whole matrix: waking a team costs more.
_PARALLEL_MIN = 1 << 16


def projected_sgd_rows_(weight: Tensor, raw: Tensor, buf: Tensor | None, norms: Tensor,
                        tangent: Tensor, lr: float, mu: float, lam: float,
                        affine: tuple[Tensor, Tensor, float, float, float] | None = None,
                        ) -> tuple[Tensor, bool]:
    """One ProjectedSGD step of one weight matrix, in place.

    ``d = n R - (t - lam / n) V``, ``b <- mu b + d``, ``V <- V - lr n b`` (``buf=None``: no
    momentum, ``b = d``), then ``||V_i||``; see ``csrc/projected_sgd.c``. With
    ``affine = (gamma, beta, eps, inv_c1, c2)`` (gamma and beta already stepped) it also gives
    the next forward's per-row constants of eq. 9.

    Returns ``(rows, nonzero)``: ``rows[0]`` the new row norms, and with ``affine``
    ``rows[1:4]`` = ``r = n + eps``, ``k = gamma / r * inv_c1``, ``shift = (beta - c2) inv_c1``;
    ``nonzero`` whether every ``gamma_i != 0``. ``weight``'s (and ``buf``'s) autograd version is
    bumped, as any in-place op would (the write goes around autograd).

    Raises:
        ValueError: tensors the kernel cannot take (see :func:`supports`) or whose shapes do
            not fit ``weight`` -- checked here, since the C code trusts them.
        RuntimeError: the kernel is not available (see :func:`unavailable_reason`).
    """
    m = weight.shape[0] if weight.dim() else 0
    rows_of = [norms, tangent] + ([] if affine is None else list(affine[:2]))
    full = [raw] + ([] if buf is None else [buf])
    if weight.dim() < 2 or any(t.shape != weight.shape for t in full) or any(
            t.shape != (m,) for t in rows_of):
        raise ValueError(f"projected_sgd_rows_: weight (m, ...) {tuple(weight.shape)} needs raw "
                         f"and buf of its shape and norms, tangent, gamma, beta of shape ({m},)")
    if not supports(weight, *full, *rows_of):
        raise ValueError("projected_sgd_rows_ takes contiguous CPU float32 or float64 tensors "
                         "of one dtype")
    return _rows_unchecked(weight, raw, buf, norms, tangent, lr, mu, lam, affine)


def _rows_unchecked(weight: Tensor, raw: Tensor, buf: Tensor | None, norms: Tensor,
                    tangent: Tensor, lr: float, mu: float, lam: float,
                    affine: tuple[Tensor, Tensor, float, float, float] | None,
                    ) -> tuple[Tensor, bool]:
    """:func:`projected_sgd_rows_` for a caller that has checked the tensors (ProjectedSGD,
    whose tensors come from the layer and its backward): the per-step host time matters at
    batch size 1."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the native ProjectedSGD step is not available: {_unavailable}")
    fn, ctype = _functions(lib)[weight.dtype]
    m = weight.shape[0]
    out = torch.empty(1 if affine is None else 4, m, dtype=weight.dtype)
    if affine is None:
        gamma_ptr = beta_ptr = None
        eps, inv_c1, c2 = 0.0, 1.0, 0.0
    else:
        gamma, beta, eps, inv_c1, c2 = affine
        gamma_ptr, beta_ptr = gamma.data_ptr(), beta.data_ptr()
    numel = weight.numel()
    threads = torch.get_num_threads() if numel >= _PARALLEL_MIN else 1
    nonzero = fn(weight.data_ptr(), raw.data_ptr(), None if buf is None else buf.data_ptr(),
                 norms.data_ptr(), tangent.data_ptr(), out.data_ptr(), m, numel // max(m, 1),
                 ctype(lr), ctype(mu), ctype(lam), gamma_ptr, beta_ptr, ctype(eps),
                 ctype(inv_c1), ctype(c2), threads)
    torch.autograd.graph.increment_version(weight)
    if buf is not None:
        torch.autograd.graph.increment_version(buf)
    return out, bool(nonzero)


@functools.cache
def _functions(lib: ctypes.CDLL) -> dict[torch.dtype, tuple[ctypes._CFuncPtr, type]]:
    return {dtype: (getattr(lib, symbol), ctype) for dtype, (symbol, ctype) in _KERNELS.items()}


@functools.cache
def _backward_functions(lib: ctypes.CDLL) -> dict[torch.dtype, tuple[ctypes._CFuncPtr, type]]:
    return {dtype: (getattr(lib, symbol), _KERNELS[dtype][1]) for dtype, symbol in
            _BACKWARD.items()}


def _layer_backward(grad: Tensor, out: Tensor, k: Tensor, shift: Tensor, gamma: Tensor,
                    r: Tensor, floor: float | None, inv_c1: float) -> tuple[Tensor, Tensor]:
    """The activation-sized part of ``_NormPropLinearRows``' backward in one pass (see
    ``csrc/projected_sgd.c``): ``gz = g k`` and ``stats = [d gamma, u / r, d beta]``, ``g`` the
    gradient through the ReLU clamp. The layer calls it only for tensors :func:`supports`
    takes, with ``grad`` and ``out`` of shape ``(B, m)`` and the rest ``(m,)``."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"the native ProjectedSGD step is not available: {_unavailable}")
    fn, ctype = _backward_functions(lib)[grad.dtype]
    rows, m = grad.shape
    gz = torch.empty_like(grad)
    stats = torch.empty(3, m, dtype=grad.dtype)
    threads = torch.get_num_threads() if grad.numel() >= _PARALLEL_MIN else 1
    fn(grad.data_ptr(), out.data_ptr(), k.data_ptr(), shift.data_ptr(), gamma.data_ptr(),
       r.data_ptr(), gz.data_ptr(), stats.data_ptr(), rows, m, floor is not None,
       ctype(0.0 if floor is None else floor), ctype(inv_c1), threads)
    return gz, stats

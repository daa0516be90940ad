"""Choice of array module (NumPy on CPU, CuPy on GPU) for the numerical core.

Every function in :mod:`reconstruct` takes arrays from one module and finds that module with
:func:`array_module`, so the same code runs on either device.  Callers never import CuPy themselves:
they ask :func:`get_xp` for the module that matches the user's ``--gpu`` choice.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np


class GPUUnavailableError(RuntimeError):
    """Raised when a GPU was requested explicitly but CuPy or a device is missing."""


def _cupy() -> ModuleType | None:
    try:
        cp = importlib.import_module("cupy")
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return None
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:
        return None
    return cp


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    return _cupy() is not None


def get_xp(gpu: bool | None = None) -> ModuleType:
    """Return the array module to compute with.

    ``gpu=True`` demands CuPy and fails with advice when it is missing; ``gpu=False`` gives NumPy;
    ``gpu=None`` (automatic) uses CuPy when a device is present and NumPy otherwise.
    """
    if gpu is False:
        return np
    cp = _cupy()
    if cp is None:
        if gpu:
            raise GPUUnavailableError(
                "--gpu was requested but no CUDA device is usable: install the 'gpu' extra "
                "(pip install '.[gpu]') on a machine with an NVIDIA GPU, or run without --gpu."
            )
        return np
    return cp


def array_module(*arrays: Any) -> ModuleType:
    """Return the module (numpy or cupy) that owns ``arrays``; NumPy for plain Python values."""
    for a in arrays:
        mod = type(a).__module__
        if mod.startswith("cupy"):
            return importlib.import_module("cupy")
    return np


def to_numpy(a: Any) -> np.ndarray:
    """Copy an array to host memory as a NumPy array (no-op for NumPy input)."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def ndimage_module(xp: ModuleType) -> ModuleType:
    """``scipy.ndimage`` for NumPy, ``cupyx.scipy.ndimage`` for CuPy."""
    if xp is np:
        return importlib.import_module("scipy.ndimage")
    return importlib.import_module("cupyx.scipy.ndimage")


def as_float(a: Any, xp: ModuleType, dtype: Any = None) -> Any:
    """Move ``a`` to ``xp`` as float32 (or ``dtype``) without copying when it already is."""
    return xp.asarray(a, dtype=dtype or xp.float32)


class _ThreadedScipyFFT:
    """``scipy.fft`` with ``workers`` threads and native float32 transforms, under NumPy's names."""

    def __init__(self, workers: int) -> None:
        import functools

        import scipy.fft as sfft

        for name in ("rfftn", "irfftn", "fftn", "ifftn", "rfft2", "irfft2", "fft2", "ifft2"):
            setattr(self, name, functools.partial(getattr(sfft, name), workers=workers))
        self.fftshift = sfft.fftshift
        self.ifftshift = sfft.ifftshift
        self.fftfreq = sfft.fftfreq
        self.rfftfreq = sfft.rfftfreq


_SCIPY_FFT: _ThreadedScipyFFT | None = None
_FFT_THREADS: int | None = None  # None: every core this process may run on


def set_fft_threads(n: int | None) -> None:
    """Threads of NumPy-side FFTs (None: all cores this process may use); processes that each do their own
    share of the work (corpus workers) set 1, so N of them keep to N cores."""
    global _SCIPY_FFT, _FFT_THREADS
    if n is not None and n < 1:
        raise ValueError(f"FFT threads must be at least 1: got {n}")
    _FFT_THREADS, _SCIPY_FFT = n, None


def _usable_cores() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def fft_module(xp: ModuleType) -> Any:
    """FFT functions for ``xp``: threaded single-precision scipy.fft for NumPy, cupy.fft for CuPy."""
    global _SCIPY_FFT
    if xp is np:
        if _SCIPY_FFT is None:
            _SCIPY_FFT = _ThreadedScipyFFT(_FFT_THREADS or _usable_cores())
        return _SCIPY_FFT
    return xp.fft

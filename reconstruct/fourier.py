"""Fourier-space helpers shared by the core: frequency grids, shifts, filters and resizing.

Layout follows FFTW's (and NumPy's ``rfftn``) half transform: the last axis holds x frequencies
0..N/2, the other axes run 0..N/2-1, -N/2..-1.  Real-space images are centred at index N//2 as in
RELION, so transforms of centred images go through ``ifftshift`` first.  Forward transforms here are
unnormalised (NumPy's default); RELION's divide by the voxel count, which only rescales.
"""

from __future__ import annotations

from typing import Any

from .backend import array_module, fft_module


def freq_grid(shape: tuple[int, ...], xp: Any, half: bool = True) -> list[Any]:
    """Integer frequency index arrays (Fourier pixels) for a transform of real shape ``shape``.

    Returns one broadcastable array per axis, in array axis order (z, y, x or y, x); with
    ``half=True`` the last axis is the rfft half axis 0..N/2.
    """
    grids = []
    nd = len(shape)
    for i, n in enumerate(shape):
        if half and i == nd - 1:
            f = xp.arange(n // 2 + 1, dtype=xp.float32)
        else:  # FFTW's convention: row i >= N/2 + 1 is frequency i - N (row N/2 is +N/2)
            f = xp.arange(n, dtype=xp.float32)
            f = xp.where(f > n // 2, f - n, f)
        sh = [1] * nd
        sh[i] = f.size
        grids.append(f.reshape(sh))
    return grids


def radius_grid(shape: tuple[int, ...], xp: Any, half: bool = True) -> Any:
    """Radius in Fourier pixels of each element of a (half) transform of real shape ``shape``.

    For non-cubic shapes each axis is scaled to the frequency units of the last axis.
    """
    n_ref = shape[-1]
    r2 = 0.0
    for n, g in zip(shape, freq_grid(shape, xp, half)):
        r2 = r2 + (g * (n_ref / n)) ** 2
    return xp.sqrt(r2)


def centred_fft(images: Any, ndim: int) -> Any:
    """rfft over the last ``ndim`` axes of images centred at N//2 (origin moved to index 0)."""
    xp = array_module(images)
    axes = tuple(range(-ndim, 0))
    return fft_module(xp).rfftn(fft_module(xp).ifftshift(images, axes=axes), axes=axes)


def centred_ifft(ft: Any, shape: tuple[int, ...]) -> Any:
    """Inverse of :func:`centred_fft`: real arrays of trailing ``shape`` centred at N//2."""
    xp = array_module(ft)
    axes = tuple(range(-len(shape), 0))
    return fft_module(xp).fftshift(fft_module(xp).irfftn(ft, s=shape, axes=axes), axes=axes)


def phase_shift_2d(ft: Any, shifts: Any, box: int) -> Any:
    """Shift a batch of 2D half transforms (B, N, N/2+1) by ``shifts`` (B, 2) pixels (x, y).

    A positive shift moves the image content towards larger x / y.  The phase factor is separable,
    exp(-2 pi i kx sx / N) exp(-2 pi i ky sy / N), so only (B, N) + (B, N/2+1) exponentials are taken.
    """
    xp = array_module(ft)
    ky, kx = freq_grid((box, box), xp)
    shifts = xp.asarray(shifts, dtype=xp.float32).reshape(-1, 2)
    cdt = xp.complex64 if ft.dtype != xp.complex128 else xp.complex128
    ex = xp.exp((-2j * xp.pi / box) * (kx[None] * shifts[:, 0, None, None])).astype(cdt)  # (B, 1, W)
    ey = xp.exp((-2j * xp.pi / box) * (ky[None] * shifts[:, 1, None, None])).astype(cdt)  # (B, H, 1)
    return ft * ey * ex


def shift_images(images: Any, shifts: Any) -> Any:
    """Shift real images (B, N, N) by subpixel ``shifts`` (B, 2) in pixels, periodically."""
    box = images.shape[-1]
    ft = centred_fft(images, 2)
    return centred_ifft(phase_shift_2d(ft, shifts, box), (box, box)).astype(images.dtype)


def lowpass_filter(
    data: Any, pixel_size: float, resolution: float, ndim: int, edge_shells: float = 2.0
) -> Any:
    """Low-pass the last ``ndim`` axes of ``data`` (a map or an image batch) to ``resolution`` Å.

    A raised-cosine edge ``edge_shells`` Fourier pixels wide, as RELION's ``lowPassFilterMap``.
    """
    xp = array_module(data)
    shape = data.shape[-ndim:]
    n = shape[-1]
    r = radius_grid(shape, xp)
    r_cut = n * pixel_size / resolution
    f = _raised_cosine(r, r_cut, edge_shells, xp)
    return centred_ifft(centred_fft(data, ndim) * f, shape).astype(data.dtype)


def _raised_cosine(r: Any, r_cut: float, width: float, xp: Any) -> Any:
    lo = r_cut - width / 2.0
    t = xp.clip((r - lo) / max(width, 1e-6), 0.0, 1.0)
    return (0.5 + 0.5 * xp.cos(xp.pi * t)).astype(xp.float32)


def bfactor_filter(data: Any, pixel_size: float, bfactor: float, ndim: int) -> Any:
    """Apply exp(-B k^2 / 4) over the last ``ndim`` axes; negative B sharpens, positive blurs."""
    xp = array_module(data)
    shape = data.shape[-ndim:]
    k = radius_grid(shape, xp) / (shape[-1] * pixel_size)
    f = xp.exp(-bfactor * k * k / 4.0).astype(xp.float32)
    return centred_ifft(centred_fft(data, ndim) * f, shape).astype(data.dtype)


def resize_fourier(data: Any, new_box: int, ndim: int) -> Any:
    """Resample images or maps to ``new_box`` by cropping or zero-padding their transforms.

    Values keep their real-space scale (densities are not multiplied by the size ratio), as RELION's
    ``resizeMap`` and the class ranker's preprocessing do.
    """
    xp = array_module(data)
    old = data.shape[-1]
    if new_box == old:
        return data
    ft = fft_module(xp).fftshift(fft_module(xp).fftn(fft_module(xp).ifftshift(data, axes=tuple(range(-ndim, 0))),
                                     axes=tuple(range(-ndim, 0))), axes=tuple(range(-ndim, 0)))
    lead = data.shape[:-ndim]
    out = xp.zeros(lead + (new_box,) * ndim, dtype=ft.dtype)
    m = min(old, new_box)
    src = tuple(slice(old // 2 - m // 2, old // 2 - m // 2 + m) for _ in range(ndim))
    dst = tuple(slice(new_box // 2 - m // 2, new_box // 2 - m // 2 + m) for _ in range(ndim))
    out[(...,) + dst] = ft[(...,) + src]
    res = fft_module(xp).fftshift(fft_module(xp).ifftn(fft_module(xp).ifftshift(out, axes=tuple(range(-ndim, 0))),
                                       axes=tuple(range(-ndim, 0))), axes=tuple(range(-ndim, 0)))
    scale = (new_box / old) ** ndim
    return (res.real * scale).astype(data.dtype)


def crop_half(ft: Any, size: int) -> Any:
    """Window half transforms (..., N, N/2+1) to (..., size, size/2+1), keeping frequency indices."""
    n = ft.shape[-2]
    if size == n:
        return ft
    xp = array_module(ft)
    pos = size // 2 + 1  # rows 0..size/2 are non-negative frequencies (FFTW), the rest negative
    rows = xp.concatenate([xp.arange(0, pos), xp.arange(n - (size - pos), n)])
    return ft[..., rows, : size // 2 + 1]


def fft_friendly_even(n: int) -> int:
    """The smallest even size >= ``n`` whose prime factors are 2, 3, 5 and 7 only.

    Transforms of such sizes are fast in pocketfft and cuFFT alike; a size with a large prime factor
    (e.g. 818 = 2 x 409) falls back to Bluestein's algorithm and costs several times more.
    """
    m = max(2, int(n) + int(n) % 2)
    while True:
        r = m
        for p in (2, 3, 5, 7):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 2

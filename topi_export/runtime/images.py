"""Image fidelity of `edit --compare`: PSNR and SSIM of two 8-bit RGB images (the ToPi result against the
unmodified pipeline's)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def image_psnr(a, b) -> float:
    """10 log10(1 / MSE) over [0, 1] pixel values; inf for identical images."""
    x, y = _array(a), _array(b)
    if x.shape != y.shape:
        raise ValueError(f"images of different sizes {x.shape} and {y.shape}")
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def image_ssim(a, b, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, data range 1) over the
    RGB channels; 1.0 for identical images. Images smaller than the window use a window of their size."""
    x = torch.from_numpy(_array(a)).permute(2, 0, 1)[None]
    y = torch.from_numpy(_array(b)).permute(2, 0, 1)[None]
    if x.shape != y.shape:
        raise ValueError(f"images of different sizes {tuple(x.shape)} and {tuple(y.shape)}")
    size = min(window, x.shape[-1], x.shape[-2])
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :]).expand(3, 1, size, size).contiguous()
    blur = lambda t: F.conv2d(t, kernel, groups=3)  # noqa: E731 - valid convolution, as the reference code
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ssim = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return float(ssim.mean())

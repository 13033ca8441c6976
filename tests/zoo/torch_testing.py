"""Helpers of the parity tests against PyTorch modules (imported only where torch is installed)."""

import numpy as np


def numpy_state(module) -> dict[str, np.ndarray]:
    """A torch module's ``state_dict`` as float32 numpy arrays (integer buffers stay integer)."""
    import torch

    return {
        name: (value.detach().to(torch.float32) if value.is_floating_point() else value.detach()).numpy()
        for name, value in module.state_dict().items()
    }


def perturbed(module, seed: int, scale: float = 0.2):
    """Every floating parameter and persistent buffer of ``module`` ~ N(0, scale^2), except norm scales and
    BatchNorm running variances ~ 1 + N(0, scale^2) (positive); returns the module in eval mode."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    scale_like = ("norm.weight", "norm1.weight", "norm2.weight", "bn.weight", "running_var")
    # Persistent buffers only (BatchNorm statistics): non-persistent ones (Swin's shift masks,
    # MaxViT's lookup tables) are derived constants, not weights.
    persistent = set(module.state_dict())
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if not tensor.is_floating_point() or name not in persistent:
                continue
            noise = torch.randn(tensor.shape, generator=generator) * scale
            if name.endswith(scale_like) or (tensor.ndim == 1 and name.endswith("weight") and "norm" in name):
                noise = (1.0 + noise).abs() if name.endswith("running_var") else 1.0 + noise
            tensor.copy_(noise)
    return module.eval()


def torch_forward(module, images_nhwc: np.ndarray) -> np.ndarray:
    """``module`` (NCHW) on NHWC numpy images, without gradients, as numpy."""
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))).numpy()

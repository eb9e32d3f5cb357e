"""ControlNet-tile conditioning: residual scaling the original Clarity's way."""

from __future__ import annotations

import torch


def residual_scales(count: int, resemblance: float, decay: float) -> list[float]:
    """Scale of each of `count` ControlNet residuals (down blocks first, mid block last).

    A1111's "My prompt is more important" control mode, which the original uses: residual i
    is weighted resemblance x decay^(count-1-i), so the deep, low-resolution residuals keep
    the structure while the shallow ones leave the prompt room to add detail. The weights
    apply to the conditional and the unconditional pass alike (unlike diffusers' guess_mode).
    decay=1 weights all residuals equally, as diffusers' `controlnet_conditioning_scale` does.
    """
    return [resemblance * decay ** (count - 1 - i) for i in range(count)]


def scale_residuals(
    down: list[torch.Tensor] | tuple[torch.Tensor, ...], mid: torch.Tensor, scales: list[float]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Multiply the ControlNet's down and mid residuals by `scales` (from `residual_scales`)."""
    if len(scales) != len(down) + 1:
        raise ValueError(f"expected {len(down) + 1} scales, got {len(scales)}")
    return [r * s for r, s in zip(down, scales[:-1], strict=True)], mid * scales[-1]

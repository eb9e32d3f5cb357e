"""Sampler names users know (A1111 / the original Clarity) mapped to diffusers schedulers, and what a step estimated."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from clarity.params import SCHEDULER_NAMES

_SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "DPM++ 3M SDE Karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "use_karras_sigmas": True},
    ),
    "DPM++ 2M SDE Karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "DPM++ 2M Karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "DDIM": (DDIMScheduler, {}),
}
assert set(_SCHEDULERS) == set(SCHEDULER_NAMES), "params.SCHEDULER_NAMES and the scheduler table disagree"


def make_scheduler(name: str, base_config: dict[str, Any]) -> SchedulerMixin:
    """A fresh scheduler `name` built on the checkpoint's noise schedule (`base_config`).

    A fresh instance per run matters: multistep solvers keep history between steps.
    """
    try:
        cls, overrides = _SCHEDULERS[name]
    except KeyError:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(_SCHEDULERS)}") from None
    return cls.from_config(base_config, **overrides)


def denoised_estimate(
    scheduler: SchedulerMixin, output: Any, noise_pred: torch.Tensor, sample: torch.Tensor
) -> Callable[[], torch.Tensor] | None:
    """The clean latent (x0) that the step just taken predicted, as a function computed only when called.

    `output` is what `scheduler.step(noise_pred, t, sample)` returned (as a dataclass). DDIM and the
    Euler samplers return the estimate as `pred_original_sample`. DPM-Solver++ computes it inside
    `step` and returns only the next sample, so it is recomputed here from the same inputs; None
    for a scheduler that gives no estimate and that this function does not know how to ask.
    """
    given = getattr(output, "pred_original_sample", None)
    if given is not None:
        return lambda: given
    if isinstance(scheduler, DPMSolverMultistepScheduler) and scheduler.config.prediction_type == "epsilon":
        sigma = scheduler.sigmas[scheduler.step_index - 1]  # the step just taken has moved the index on
        return partial(_dpm_solver_x0, sample, noise_pred, sigma)
    return None


def _dpm_solver_x0(sample: torch.Tensor, noise_pred: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 from the noise prediction, as DPM-Solver++ computes it (its `convert_model_output`).

    Its samples are x_t = alpha_t x0 + sigma_t eps with alpha_t = 1 / sqrt(1 + s^2) and sigma_t = s alpha_t
    for the step's sigma s (the k-diffusion sigma: sqrt((1 - alphas_cumprod) / alphas_cumprod) at the step's
    point of the noise schedule), so x0 = (x_t - sigma_t eps) / alpha_t = x_t sqrt(1 + s^2) - s eps.
    """
    s = float(sigma)
    return sample * (1 + s * s) ** 0.5 - s * noise_pred

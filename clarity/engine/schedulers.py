"""Sampler names users know (A1111 / the original Clarity) mapped to diffusers schedulers."""

from __future__ import annotations

from typing import Any

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

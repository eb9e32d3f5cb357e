"""What an upscale gives back and reports as it goes: `UpscaleResult`, `UpscaleStats`, `ProgressEvent`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    from clarity.engine.pipeline import PassStats


@dataclass(frozen=True)
class ProgressEvent:
    """Where a running upscale is: variant, pass and denoising step (step 0 = pass starting).

    After a denoising step (step >= 1), `preview()` returns an RGB picture of what the current pass
    is heading for: the step's estimate of the finished latent, mapped to colours without the VAE
    (engine/preview.py), a quarter of the pass's output width and height, at most 1024 px on the
    long side. It is made only when called, at a small fraction of a step's cost, and only while
    the callback runs: call it there; afterwards it raises `RuntimeError`. It is None at the start
    of a pass (step 0).
    """

    variant: int
    variants: int
    pass_index: int
    passes: int
    step: int
    steps: int
    #: Neither compared nor shown: an event is where the upscale is; the preview is a way to look at it.
    preview: Callable[[], Image.Image] | None = field(default=None, compare=False, repr=False)

    @property
    def fraction(self) -> float:
        """Share of all denoising work done, 0..1 (passes counted as equal shares)."""
        within_pass = self.step / self.steps if self.steps else 0.0  # step 0 of 0: the pass is starting
        done_passes = self.variant * self.passes + self.pass_index + within_pass
        return done_passes / (self.variants * self.passes)


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class UpscaleStats:
    """What an upscale did: every pass run (variant by variant), seeds, and total time."""

    model: str
    tiny_model: bool
    device: str
    seeds: list[int] = field(default_factory=list)
    passes: list[PassStats] = field(default_factory=list)
    #: What was retried with smaller settings after running out of memory, and how.
    retries: list[str] = field(default_factory=list)
    #: With `pattern`: the axes ("x", "y") along which the input did not tile and was cross-faded.
    pattern_crossfaded: list[str] = field(default_factory=list)
    seconds: float = 0.0
    #: Which pre-upscaler brought each pass to size (`params.upscaler`).
    pre_upscaler: str = "lanczos"
    #: Dtypes, attention processors and speed options in effect (see engine/acceleration.py).
    acceleration: dict[str, Any] = field(default_factory=dict)

    @property
    def unet_evaluations(self) -> int:
        """UNet forward samples over all passes (one tile through one guidance branch = 1)."""
        return sum(p.unet_evaluations for p in self.passes)

    @property
    def seconds_by_stage(self) -> dict[str, float]:
        """Seconds spent in each stage of a pass (pre_upscale, denoise, ...), summed over all passes."""
        totals: dict[str, float] = {}
        for p in self.passes:
            for stage, seconds in p.seconds.items():
                totals[stage] = totals.get(stage, 0.0) + seconds
        return totals


@dataclass
class UpscaleResult:
    """The upscaled images, one per variant, and the statistics of the whole upscale."""

    images: list[Image.Image]
    stats: UpscaleStats

    @property
    def image(self) -> Image.Image:
        """The first (usually only) variant."""
        return self.images[0]

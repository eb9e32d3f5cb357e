"""A request's denoising work, checked against the server's budget before any work.

One request can hold a worker for hours (a tiny image at scale 16, 100 steps at full creativity,
16-pixel tiles, four variants): its work is known from its parameters (`clarity.denoising_work`),
so it is refused at once with a 400 naming the parameter that drives it, the one whose default
would cut the work most.
"""

from __future__ import annotations

from clarity import UpscaleParams, denoising_work
from clarity.api.errors import APIError, invalid

#: Parameters a request may push far from their defaults, tried one at a time at their defaults.
_DRIVERS = ("scale_factor", "num_inference_steps", "creativity", "tiling_width", "tiling_height", "tile_overlap",
            "multistep_factor", "dynamic")


def check_budget(image_size: tuple[int, int], params: UpscaleParams, n: int, limit: float) -> None:
    """Raise a 400 naming the driving parameter (or `n`) if the request needs more than `limit` megapixel-steps."""
    work = denoising_work(image_size, params, n).megapixel_steps
    if work <= limit:
        return
    defaults = UpscaleParams()
    candidates = {"n": denoising_work(image_size, params, 1).megapixel_steps} if n > 1 else {}
    for name in _DRIVERS:
        default = getattr(defaults, name)
        if getattr(params, name) != default:
            candidates[name] = _work_with(image_size, params, n, name, default)
    driver = min(candidates, key=candidates.__getitem__) if candidates else "image"
    raise _over_budget(driver, work, limit, candidates.get(driver), None if driver in ("n", "image") else
                       getattr(defaults, driver))


def _work_with(image_size: tuple[int, int], params: UpscaleParams, n: int, name: str, value: object) -> float:
    try:
        changed = params.replace(**{name: value})
    except ValueError:  # e.g. the default tile size with this request's overlap: not a way out
        return float("inf")
    return denoising_work(image_size, changed, n).megapixel_steps


def _over_budget(driver: str, work: float, limit: float, without: float | None, default: object) -> APIError:
    message = (f"This request needs about {work:,.0f} megapixel-steps of denoising (pixels the model sees x"
               f" steps x 2 with guidance x variants); this server's limit is {limit:,.0f}.")
    if driver == "image":
        message += " Send a smaller image, or fewer steps."
    elif driver == "n":
        message += f" {driver} drives it: one variant needs about {without:,.0f}."
    else:
        message += f" {driver} drives it: at its default ({default}) the request needs about {without:,.0f}."
    return invalid(driver, message, code="over_compute_budget")

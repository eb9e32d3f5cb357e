"""Running out of device memory: retry with settings that need less and change the result least."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from clarity.params import UpscaleParams

Result = TypeVar("Result")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` says the device ran out of memory."""
    # CUDA raises torch.OutOfMemoryError; the CPU allocator a RuntimeError with this wording.
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def smaller_memory_settings(params: UpscaleParams) -> UpscaleParams | None:
    """Settings that need less memory and change the result least, or None when none are left.

    The tile batch does not change the result at all; the VAE tile size only slightly. Tile
    sizes, which shape the invented detail, are never changed behind the caller's back.
    """
    if params.tile_batch_size > 1:
        return params.replace(tile_batch_size=params.tile_batch_size // 2)
    if params.vae_tile_size >= 256:
        return params.replace(vae_tile_size=max(128, params.vae_tile_size // 2 // 64 * 64))
    return None


def with_memory_retries(
    run: Callable[[UpscaleParams], Result], params: UpscaleParams, on_retry: Callable[[str], None]
) -> Result:
    """`run(params)`, retried with settings that need less memory while the device runs out.

    Before each retry, `on_retry` is told in one line what ran out and what is tried instead.
    Any other error, and running out when nothing smaller is left, is raised.
    """
    while True:
        try:
            return run(params)
        except (torch.OutOfMemoryError, RuntimeError) as error:
            smaller = smaller_memory_settings(params) if is_out_of_memory(error) else None
            if smaller is None:
                raise
            on_retry(
                f"out of memory with tile_batch_size={params.tile_batch_size},"
                f" vae_tile_size={params.vae_tile_size}; retried with"
                f" tile_batch_size={smaller.tile_batch_size}, vae_tile_size={smaller.vae_tile_size}"
            )
            params = smaller
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

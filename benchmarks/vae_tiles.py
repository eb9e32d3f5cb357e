"""The VAE's seconds per MP by image size and VAE tile: `python -m benchmarks.vae_tiles [--cases ...] [--output PATH]`.

Encode then decode of one square image (`clarity.engine.vae`, as the engine calls them) on the
model's VAE as the engine prepares it (`--vae-dtype auto --vae-channels-last auto`), one process,
after a 512 px warm-up: 1024 px untiled, then 2048 px in 1024 px tiles (the default), in 1280 px
tiles, and untiled (`--cases 512:untiled 1024:untiled 2048:1024` runs only those, the first as the
warm-up). Peak RSS is the process's so far (`ru_maxrss`), so it only grows down the list.
Writes benchmarks/results/latest/vae_tiles.json by default. By default on the full-size random model.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

#: (side, VAE tile size in px or None for untiled), in the order they run.
CASES = ((512, None), (1024, None), (2048, 1024), (2048, 1280), (2048, None))


def _case(text: str) -> tuple[int, int | None]:
    side, _, tile = text.partition(":")
    if not side.isdigit() or not (tile == "untiled" or tile.isdigit()):
        raise argparse.ArgumentTypeError(f"expected SIDE:TILE such as 2048:1024 or 1024:untiled, got {text!r}")
    return int(side), None if tile == "untiled" else int(tile)


def main(argv: list[str] | None = None) -> int:
    import torch

    from benchmarks.__main__ import LATEST_RESULTS, cached_random_model
    from benchmarks.common import machine, sample_image
    from clarity import Upscaler
    from clarity.engine import vae as vae_ops
    from clarity.engine.images import pil_to_tensor

    parser = argparse.ArgumentParser(prog="python -m benchmarks.vae_tiles", description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=None, help="Model folder (default: full-size random).")
    parser.add_argument("--output", type=Path, default=LATEST_RESULTS / "vae_tiles.json")
    parser.add_argument("--cases", type=_case, nargs="+", default=list(CASES), metavar="SIDE:TILE",
                        help="Image side and VAE tile in px (or 'untiled'), in order; the first is the warm-up.")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    vae = Upscaler.from_pretrained(args.weights or cached_random_model(), device="cpu").pipeline.vae
    rows = []
    for index, (side, tile) in enumerate(args.cases):
        image = pil_to_tensor(sample_image(side, side))
        load = machine()["load_average_1_5_15"]
        started = time.perf_counter()
        latents = vae_ops.encode(vae, image, torch.Generator().manual_seed(0), tile_size=tile)
        encoded = time.perf_counter()
        vae_ops.decode(vae, latents, tile_size=tile)
        decoded = time.perf_counter()
        megapixels = side * side / 1e6
        row = {"side": side, "vae_tile": tile, "warm_up": index == 0, "encode_seconds": round(encoded - started, 2),
               "decode_seconds": round(decoded - encoded, 2),
               "seconds_per_mp": round((decoded - started) / megapixels, 2),
               "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
               "load_average_before": load}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"model": str(args.weights or "random-sd15"), "machine": machine(),
                                       "vae_dtype": str(vae.dtype), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

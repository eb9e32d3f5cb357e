"""Peak memory of very large outputs (issue: 100 MP on the CPU within a bounded peak memory).

A 100 MP upscale on the tiny model would denoise for hours on two cores, so each job runs with
the UNet and ControlNet answering zeros (`python -m benchmarks.job clarity_no_denoiser`): all
the engine's whole-image buffers are real, while the denoiser's activations, which follow the
tile size, are left out. Each size runs in a fresh process; peak RSS is `ru_maxrss`.
"""

from __future__ import annotations

from typing import Any

from benchmarks.common import Bench, run_capped

#: Output sides: 25 and 100 MP (4 MP with --quick).
SIDES, QUICK_SIDES = (5000, 10000), (2048,)
MAX_SECONDS, MAX_RSS_BYTES = 1800, 16 * 10**9


def run(bench: Bench) -> dict[str, Any]:
    rows = []
    for side in QUICK_SIDES if bench.quick else SIDES:
        job = run_capped(["benchmarks.job", "clarity_no_denoiser", "--weights", str(bench.weights),
                          "--side", str(side)], MAX_SECONDS, MAX_RSS_BYTES)
        row: dict[str, Any] = {"side": side, "megapixels": round(side * side / 1e6, 1), **job}
        if "peak_rss_mb" in job:
            grown = job["peak_rss_mb"] - job["rss_after_loading_mb"]
            row["bytes_per_output_pixel"] = round(grown * 2**20 / (side * side), 1)
        rows.append(row)
    return {"rows": rows, "caps": {"seconds": MAX_SECONDS, "rss_bytes": MAX_RSS_BYTES}}


def chart(result: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [row for row in result["rows"] if "peak_rss_mb" in row]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.bar([f"{row['megapixels']:g} MP" for row in done], [row["peak_rss_mb"] / 1024 for row in done])
    axis.set_ylabel("peak RSS (GiB)")
    axis.set_title(f"Peak memory, denoiser forwards stubbed ({result['meta']['model']} model, CPU)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)

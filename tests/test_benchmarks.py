"""The benchmark's baselines reproduce the published figures they are compared against."""

from __future__ import annotations

import json

import pytest

from benchmarks.tile_overhead import computed_ratios


@pytest.mark.parametrize(
    ("side", "original", "ours"),
    # REFERENCE §7: the original's grid processes 1.75, 1.48, 1.23 and 1.23 times the latent
    # area at 1, 4, 16 and 64 MP; evenly shrunk tiles with overlap 8 about 1.06, 1.10, 1.11, 1.13.
    [(1024, 1.75, 1.06), (2048, 1.48, 1.10), (4096, 1.23, 1.11), (8192, 1.23, 1.13)],
)
def test_tile_overhead_baselines(side, original, ours):
    ratios = computed_ratios(side)
    assert ratios["original_clarity"] == pytest.approx(original, abs=0.005)
    assert ratios["ours"] == pytest.approx(ours, abs=0.01)
    assert ratios["ours"] <= ratios["least_possible"] * 1.02  # the target


# --- tiny runs of the measuring benchmarks: they produce sane numbers, not meaningful ones ---------


def test_scaling_measures_each_engine_in_its_own_process(tiny_weights):
    from benchmarks.scaling import measure, summarize

    rows = measure(tiny_weights, sides=(64,), max_seconds=300, max_rss_bytes=8 * 10**9,
                   engines=("clarity", "naive_vae_tiling"))
    assert [r["engine"] for r in rows] == ["clarity", "naive_vae_tiling"]
    for row in rows:
        assert row["seconds"] > 0 and row["seconds_per_mp"] == pytest.approx(row["seconds"] / row["megapixels"])
        # ru_maxrss of a fresh process: at least what the loaded model holds, far from this process's
        assert row["rss_after_loading_mb"] <= row["peak_rss_mb"] < 4096
    summary = summarize(rows)
    assert summary["speedup_vs_naive_vae_tiling"][64] == pytest.approx(rows[1]["seconds"] / rows[0]["seconds"])


def test_scaling_stops_a_job_at_the_cap_and_skips_larger_sizes(tiny_weights):
    from benchmarks.scaling import measure, summarize

    rows = measure(tiny_weights, sides=(64, 128), max_seconds=0.5, max_rss_bytes=8 * 10**9, engines=("naive",))
    assert all("seconds" not in r for r in rows)
    assert rows[0]["stopped"].startswith("time cap")
    assert all(r["stopped"].startswith("not run") for r in rows if r["side"] == 128)
    assert summarize(rows)["seconds_per_mp_largest_deviation_from_mean"] is None


def test_time_shares_split_the_wall_time(upscaler):
    from benchmarks.time_shares import measure

    result = measure(upscaler, side=128)
    assert set(result["model_seconds"]) == {"unet", "controlnet", "vae_encoder", "vae_decoder", "text_encoder"}
    assert 0 < result["model_share"] <= 1
    assert sum(result["shares"].values()) == pytest.approx(result["model_share"])
    assert result["shares"]["unet"] > result["shares"]["text_encoder"]
    # Each stage's time outside the models is what is left after its models' forwards.
    assert all(seconds > -1e-3 for seconds in result["outside_models_seconds_by_stage"].values())
    outside = sum(result["outside_models_seconds_by_stage"].values())
    assert outside == pytest.approx(result["wall_seconds"] * (1 - result["model_share"]), abs=1e-3)


def test_server_overhead_runs_the_job_both_ways(upscaler, tiny_weights):
    from benchmarks.server_overhead import measure

    result = measure(upscaler, tiny_weights, side=128, rounds=1, throughput_side=64, jobs=2)
    overhead = result["overhead"]
    assert len(overhead["seconds"]["http"]) == len(overhead["seconds"]["in_process"]) == 1
    assert overhead["http_over_in_process"] > 0
    assert [r["clients"] for r in result["throughput"]["rows"]] == [1, 2, 4]
    assert all(r["images_per_minute"] > 0 for r in result["throughput"]["rows"])


def test_gpu_benchmark_is_skipped_with_a_reason_without_cuda(tmp_path, tiny_weights):
    from benchmarks.__main__ import main

    assert main(["--only", "gpu", "--weights", str(tiny_weights), "--device", "cpu", "--results", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert "CUDA" in result["skipped"] and result["rows"] == []
    assert not (tmp_path / "gpu.png").exists()


def test_tile_costs_follow_the_planned_tile(upscaler):
    from benchmarks.scaling import tile_costs

    rows = tile_costs(upscaler, sides=(256, 512), rounds=1)
    assert [(r["tile"], r["tiles"]) for r in rows] == [([32, 32], 1), ([64, 64], 1)]  # the whole latent
    assert all(r["ms_per_latent_pixel"] > 0 for r in rows)


def test_large_output_job_runs_everything_but_the_denoiser(tiny_weights, monkeypatch):
    from benchmarks import large_output
    from benchmarks.common import Bench

    monkeypatch.setattr(large_output, "QUICK_SIDES", (256,))
    result = large_output.run(Bench(upscaler=None, weights=tiny_weights, quick=True))
    (row,) = result["rows"]
    assert row["megapixels"] == pytest.approx(0.1, abs=0.01)
    # The zero-answering denoiser costs nothing: what remains (VAE, conversions) is quick.
    assert 0 < row["seconds"] < 60 and row["peak_rss_mb"] >= row["rss_after_loading_mb"]
    assert row["bytes_per_output_pixel"] >= 0


def test_preview_benchmark_times_previews_steps_and_uncalled_previews(upscaler):
    from benchmarks.preview import in_upscale, latent_alone

    row = in_upscale(upscaler, side=64)
    assert row["latent_size"] == [8, 8] and row["step_seconds"] > 0 and row["preview_seconds"] > 0
    assert row["preview_share_of_step"] == pytest.approx(row["preview_seconds"] / row["step_seconds"])
    alone = latent_alone(upscaler.pipeline.scheduler_config, upscaler.device)
    assert 0 < alone["uncalled_preview_seconds"] < alone["map_seconds"] < alone["preview_seconds"]


def test_the_gpu_check_says_why_it_skips_without_cuda(tmp_path):
    import torch

    from benchmarks.gpu import main

    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the check would run for minutes")
    output = tmp_path / "gpu.json"
    assert main(["--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert result["rows"] == [] and "no CUDA device" in result["skipped"]


def test_vae_tiles_runs_the_cases_asked_for(tmp_path, tiny_weights):
    from benchmarks.vae_tiles import main

    output = tmp_path / "vae_tiles.json"
    assert main(["--weights", str(tiny_weights), "--cases", "64:untiled", "256:128", "--output", str(output)]) == 0
    result = json.loads(output.read_text())
    assert [(row["side"], row["vae_tile"], row["warm_up"]) for row in result["rows"]] == [
        (64, None, True), (256, 128, False)]
    assert all(row["seconds_per_mp"] > 0 for row in result["rows"]) and "cpu_model" in result["machine"]
    with pytest.raises(SystemExit):
        main(["--cases", "2048:big"])

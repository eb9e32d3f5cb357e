"""The `clarity` command as a user runs it."""

from __future__ import annotations

import re
import time

from conftest import make_test_image
from PIL import Image

from clarity.cli import main


def test_upscale_writes_the_image_at_the_requested_scale(tiny_weights, tmp_path, capsys):
    source = tmp_path / "in.png"
    make_test_image(30, 20).save(source)
    target = tmp_path / "out" / "result.jpg"
    code = main(["upscale", str(source), "-o", str(target), "--weights", str(tiny_weights), "--scale", "3",
                 "--steps", "4", "--creativity", "0.5", "--seed", "9", "--quality", "80"])
    assert code == 0
    with Image.open(target) as result:
        assert (result.format, result.size) == ("JPEG", (90, 60))
    out = capsys.readouterr()
    assert "seed 9" in out.out and "2 pass(es)" in out.out
    assert "tiny test model" in out.err


def test_bad_parameter_is_reported_by_name(tiny_weights, tmp_path, capsys):
    source = tmp_path / "in.png"
    make_test_image(16, 16).save(source)
    code = main(["upscale", str(source), "-o", str(tmp_path / "o.png"), "--weights", str(tiny_weights),
                 "--creativity", "1.5"])
    assert code == 2
    assert "creativity: must be <= 1" in capsys.readouterr().err


def test_unknown_output_extension_fails_before_any_work(tmp_path, capsys):
    source = tmp_path / "in.png"
    make_test_image(16, 16).save(source)
    assert main(["upscale", str(source), "-o", str(tmp_path / "o.xyz"), "--weights", str(tmp_path)]) == 2
    assert "output" in capsys.readouterr().err


def test_missing_weights_point_to_the_fix(tmp_path, capsys):
    source = tmp_path / "in.png"
    make_test_image(16, 16).save(source)
    assert main(["upscale", str(source), "-o", str(tmp_path / "o.png"), "--weights", str(tmp_path / "none")]) == 1
    assert "clarity weights tiny" in capsys.readouterr().err


def test_weights_tiny_writes_a_loadable_model(tmp_path):
    assert main(["weights", "tiny", str(tmp_path / "tiny")]) == 0
    assert (tmp_path / "tiny" / "controlnet" / "config.json").exists()
    assert (tmp_path / "tiny" / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_mask_option_keeps_the_white_area(tiny_weights, tmp_path):
    source, mask, target = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    image = make_test_image(24, 16)
    image.save(source)
    Image.new("L", (24, 16), 255).save(mask)
    assert main(["upscale", str(source), "-o", str(target), "--weights", str(tiny_weights),
                 "--mask", str(mask), "--steps", "4", "--creativity", "0.5"]) == 0
    with Image.open(target) as result:
        assert result.tobytes() == image.resize((48, 32), Image.Resampling.LANCZOS).tobytes()


def _batch(tiny_weights, *arguments: str) -> int:
    return main(["upscale", *arguments, "--weights", str(tiny_weights), "--steps", "2", "--creativity", "0.5"])


def test_a_folder_is_upscaled_into_a_folder_and_a_bad_file_does_not_stop_the_batch(tiny_weights, tmp_path, capsys):
    photos, results = tmp_path / "photos", tmp_path / "results"
    photos.mkdir()
    make_test_image(20, 16, seed=1).save(photos / "a.png")
    make_test_image(16, 24, seed=2).save(photos / "b.jpg")
    (photos / "c.png").write_bytes(b"not an image")
    (photos / "notes.txt").write_text("not an image either, and not an image name")

    assert _batch(tiny_weights, str(photos), "-o", str(results)) == 1  # one failure: exit 1, after the others
    out = capsys.readouterr()
    assert "done: 2 written, 0 skipped, 1 failed" in out.out
    assert f"{photos / 'c.png'}: image: not a supported image" in out.err
    assert sorted(p.name for p in results.iterdir()) == ["a.png", "b.png"]  # nothing half-written is left
    assert Image.open(results / "a.png").size == (40, 32) and Image.open(results / "b.png").size == (32, 48)

    # Run again: what exists is skipped, so an interrupted batch resumes; only the bad file is retried.
    before = (results / "a.png").stat().st_mtime_ns
    assert _batch(tiny_weights, str(photos), "-o", str(results)) == 1
    out = capsys.readouterr()
    assert "skipping 2 image(s)" in out.out and "done: 0 written, 2 skipped, 1 failed" in out.out
    assert (results / "a.png").stat().st_mtime_ns == before

    (photos / "c.png").unlink()
    assert _batch(tiny_weights, str(photos / "a.png"), str(photos / "b.jpg"), "-o", str(results), "--overwrite",
                  "--format", "webp") == 0
    assert "done: 2 written, 0 skipped, 0 failed" in capsys.readouterr().out
    assert Image.open(results / "a.webp").format == "WEBP"


def test_inputs_that_would_share_a_result_name_fail_before_any_work(tmp_path, capsys):
    make_test_image(8, 8).save(tmp_path / "a.png")
    make_test_image(8, 8).save(tmp_path / "a.jpg")
    code = main(["upscale", str(tmp_path / "a.png"), str(tmp_path / "a.jpg"), "-o", str(tmp_path / "out"),
                 "--weights", str(tmp_path / "no-weights-needed")])
    assert code == 2
    assert "would both be written to" in capsys.readouterr().err


def test_several_inputs_need_an_output_folder_not_a_file(tmp_path, capsys):
    make_test_image(8, 8).save(tmp_path / "a.png")
    (tmp_path / "taken.png").write_bytes(b"x")
    code = main(["upscale", str(tmp_path / "a.png"), str(tmp_path / "a.png"), "-o", str(tmp_path / "taken.png"),
                 "--weights", str(tmp_path)])
    assert code == 2
    assert "give an output folder" in capsys.readouterr().err


def test_a_result_never_replaces_its_input(tmp_path, capsys):
    make_test_image(8, 8).save(tmp_path / "a.png")
    code = main(["upscale", str(tmp_path), "-o", str(tmp_path), "--overwrite", "--weights", str(tmp_path)])
    assert code == 2
    assert "would replace it" in capsys.readouterr().err
    assert Image.open(tmp_path / "a.png").size == (8, 8)


def test_a_batch_can_run_on_a_server(tiny_weights, tmp_path, tmp_path_factory, capsys, monkeypatch):
    from conftest import ServerProcess

    photos, results = tmp_path / "photos", tmp_path / "results"
    photos.mkdir()
    make_test_image(20, 16, seed=1).save(photos / "a.png")
    make_test_image(24, 16, seed=2).save(photos / "b.png")
    Image.new("RGB", (3000, 3000)).save(photos / "huge.png")  # 6000x6000 would exceed the server's cap
    server = ServerProcess(tiny_weights, tmp_path_factory.mktemp("cli-server") / "server.log",
                           ["--api-key", "sk-cli", "--max-output-mp", "1"])
    try:
        server.wait_healthy()
        code = main(["upscale", str(photos), "-o", str(results), "--server", server.url, "--api-key", "sk-cli",
                     "--steps", "2", "--creativity", "0.5", "--format", "webp", "--seed", "5"])
        out = capsys.readouterr()
        assert code == 1, out
        assert "done: 2 written, 0 skipped, 1 failed" in out.out
        # Checked when the job runs (the image's size is known then): the job fails, naming the field.
        assert re.search(r"huge.png: job job_\w+ failed on the server: scale_factor: the output would be 6000x6000",
                         out.err), out.err
        assert "seed 5" in out.out  # the parameters travelled
        with Image.open(results / "a.webp") as result:
            assert (result.format, result.size) == ("WEBP", (40, 32))

        code = main(["upscale", str(photos / "a.png"), "-o", str(tmp_path / "one.png"), "--server", server.url,
                     "--api-key", "wrong"])
        err = capsys.readouterr().err
        assert code == 1 and "server answered 401" in err and "the key given" in err and "was refused" in err
        monkeypatch.delenv("CLARITY_API_KEY", raising=False)
        code = main(["upscale", str(photos / "a.png"), "-o", str(tmp_path / "one.png"), "--server", server.url])
        assert code == 1 and "no key was sent" in capsys.readouterr().err
        code = main(["upscale", str(photos), "-o", str(tmp_path / "other"), "--server", server.url,
                     "--api-key", "sk-cli", "--model", "sdxl"])
        assert code == 1 and "does not serve model 'sdxl'; it serves clarity-upscaler" in capsys.readouterr().err
    finally:
        server.stop()
    # Gone: said once, quickly, instead of once per image after every retry.
    started = time.monotonic()
    assert main(["upscale", str(photos), "-o", str(tmp_path / "other"), "--server", server.url]) == 1
    assert "cannot reach the server" in capsys.readouterr().err and time.monotonic() - started < 20
    assert not (tmp_path / "other").exists()


# --- what a first-time user hit ---------------------------------------------------------------------


def test_the_server_client_comes_with_the_plain_install():
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    plain = [Requirement(line) for line in requires("clarity-upscaler") if "extra ==" not in line]
    assert "openai" in {requirement.name for requirement in plain}  # `--server` needs no extra install


def test_seed_help_shows_its_range_as_integers(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["upscale", "--help"])
    assert "Range 0-4294967295." in " ".join(capsys.readouterr().out.split())


def test_a_missing_input_is_reported_before_the_model_loads(tmp_path, capsys):
    no_weights = str(tmp_path / "no-weights")  # loading would fail with its own error
    assert main(["upscale", str(tmp_path / "typo.png"), "-o", str(tmp_path / "o.png"), "--weights", no_weights]) == 2
    assert "typo.png: no such file" in capsys.readouterr().err
    make_test_image(8, 8).save(tmp_path / "a.png")
    assert main(["upscale", str(tmp_path / "a.png"), str(tmp_path / "typo.png"), "-o", str(tmp_path / "out"),
                 "--weights", no_weights]) == 1
    err = capsys.readouterr().err
    assert err.index("typo.png: no such file") < err.index("clarity weights tiny")


def _spawn_cli(arguments: list[str], **options):
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "clarity.cli", *arguments], env=env, **options)


def test_ctrl_c_in_a_batch_is_one_line_exit_130_and_no_partial_file(tiny_weights, tmp_path):
    import signal
    import subprocess

    photos, results = tmp_path / "photos", tmp_path / "results"
    photos.mkdir()
    for index in range(30):
        make_test_image(24, 24, seed=index).save(photos / f"{index:02}.png")
    process = _spawn_cli(["upscale", str(photos), "-o", str(results), "--weights", str(tiny_weights), "--steps", "2",
                          "--creativity", "0.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "wrote" in process.stdout.readline()  # the batch is under way
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "clarity: interrupted" and "Traceback" not in err
    written = list(results.iterdir())
    assert 1 <= len(written) < 30 and all(not path.name.startswith(".") for path in written)
    for path in written:
        with Image.open(path) as result:
            result.load()  # whole, or it would not be there


def test_on_a_terminal_progress_bars_and_messages_never_share_a_line(tiny_weights, tmp_path):
    import os
    import pty
    import re
    import threading

    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(3):
        make_test_image(24, 16, seed=index).save(photos / f"{index}.png")
    controller, terminal = pty.openpty()
    process = _spawn_cli(["upscale", str(photos), "-o", str(tmp_path / "results"), "--weights", str(tiny_weights),
                          "--steps", "2", "--creativity", "0.5"], stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal closed with the process
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert process.wait(120) == 0
    reader.join(10)
    os.close(controller)
    screen = b"".join(chunks).decode(errors="replace")
    # What each line shows on a terminal: the text after its last carriage return.
    shown = [line.rsplit("\r", 1)[-1] for line in screen.replace("\r\n", "\n").split("\n")]
    messages = [line for line in shown if re.search(r"wrote |clarity: ", line)]
    assert len([line for line in messages if "wrote " in line]) == 3, screen
    assert "tiny test model" in screen
    assert not [line for line in messages if "%|" in line], screen

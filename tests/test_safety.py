"""The optional safety checker: not installed, flagged, not flagged; and the API's answer to a flag."""

from __future__ import annotations

import pytest

from clarity import Upscaler
from clarity.engine.safety import SafetyChecker
from clarity.errors import ContentPolicyError, ParamError
from clarity.params import UpscaleParams
from clarity.testing.fixtures import save_tiny_safety_checker
from tests.conftest import FAST, edit_handler, make_test_image


@pytest.fixture(scope="module")
def checkers(tmp_path_factory):
    """Tiny checkers whose verdict is forced by their concept thresholds."""
    root = tmp_path_factory.mktemp("safety")
    return {
        "never": save_tiny_safety_checker(root / "never", concept_threshold=2.0),
        "always": save_tiny_safety_checker(root / "always", concept_threshold=-2.0),
    }


def test_off_by_default():
    assert UpscaleParams().enable_safety_checker is False


def test_asked_for_but_not_installed_says_how_to_install(upscaler, tmp_path):
    for folder in (None, tmp_path / "safety_checker"):
        checked = Upscaler(upscaler.pipeline, safety_checker_dir=folder)
        with pytest.raises(ParamError) as caught:
            checked.upscale(make_test_image(32, 32), enable_safety_checker=True, **FAST)
        assert caught.value.param == "enable_safety_checker"
        assert "install" in caught.value.message and "weights/README.md" in caught.value.message
    # Not asked for: the missing checker does not matter.
    assert Upscaler(upscaler.pipeline).upscale(make_test_image(32, 32), **FAST).image.size == (64, 64)


def test_not_flagged_passes(upscaler, checkers):
    checked = Upscaler(upscaler.pipeline, safety_checker_dir=checkers["never"])
    result = checked.upscale(make_test_image(32, 32), enable_safety_checker=True, num_images=2, **FAST)
    assert len(result.images) == 2


def test_flagged_output_fails_the_request(upscaler, checkers):
    checked = Upscaler(upscaler.pipeline, safety_checker_dir=checkers["always"])
    with pytest.raises(ContentPolicyError, match="flagged"):
        checked.upscale(make_test_image(32, 32), enable_safety_checker=True, **FAST)
    # The same checker is not consulted unless asked.
    assert checked.upscale(make_test_image(32, 32), **FAST).image.size == (64, 64)


def test_checker_verdicts(checkers):
    images = [make_test_image(40, 30), make_test_image(64, 64, "L")]
    assert SafetyChecker.load(checkers["never"]).flagged(images) == [False, False]
    assert SafetyChecker.load(checkers["always"]).flagged(images) == [True, True]


def test_server_answers_a_flag_with_openais_content_policy_error(tiny_weights, tmp_path):
    from clarity.api.errors import APIError
    from clarity.api.wire import EditRequest

    class FlaggingUpscaler:
        def upscale(self, *args, **kwargs):
            raise ContentPolicyError("the safety checker flagged output(s) [0]")

    handler = edit_handler(tiny_weights, tmp_path)
    handler.upscalers = {"clarity-upscaler": FlaggingUpscaler()}
    request = EditRequest(make_test_image(16, 16), UpscaleParams(enable_safety_checker=True))
    with pytest.raises(APIError) as caught:
        handler.run(request)
    assert caught.value.status == 400
    error = caught.value.body["error"]
    assert error["code"] == "content_policy_violation" and error["type"] == "invalid_request_error"
    assert "flagged" in error["message"]

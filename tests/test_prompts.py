"""Prompts as users write them: A1111 weighting, long prompts, <lora:...> tags, embeddings by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAST, make_test_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from clarity import ParamError, Upscaler
from clarity.engine.prompt_syntax import parse_weighting, split_lora_tags
from clarity.errors import WeightsError
from clarity.testing.adapters import save_tiny_embedding, save_tiny_lora

#: A small fast upscale whose output the prompt visibly steers (colour fix off: it would mask it).
RUN = {"color_fix": "none", **FAST}


@pytest.fixture(scope="session")
def adapters_dir(tiny_weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    lora = load_file(save_tiny_lora(root / "loras" / "tiny.detail.v1.safetensors", tiny_weights))
    for part, prefix in (("unet_only", "lora_unet_"), ("te_only", "lora_te_")):
        save_file({k: v for k, v in lora.items() if k.startswith(prefix)}, str(root / "loras" / f"{part}.safetensors"))
    (root / "loras" / "broken.safetensors").write_bytes(b"not a safetensors file")
    save_tiny_lora(root / "outside.safetensors", tiny_weights, seed=1)  # beside the folder, not in it
    save_tiny_embedding(root / "embeddings" / "easyneg.safetensors", tiny_weights)
    save_tiny_embedding(root / "embeddings" / "badpt.pt", tiny_weights, num_vectors=3, seed=1)
    save_tiny_embedding(root / "embeddings" / "otherwidth.safetensors", 16)  # for another model
    return root


@pytest.fixture(scope="session")
def prompt_upscaler(tiny_weights, adapters_dir):
    """An upscaler with LoRA and embedding folders; the shared `upscaler` has none and never loads any."""
    return Upscaler.from_pretrained(tiny_weights, device="cpu", lora_dir=adapters_dir / "loras",
                                    embeddings_dir=adapters_dir / "embeddings")


def encode(upscaler, prompt: str, negative_prompt: str = "") -> torch.Tensor:
    return upscaler.pipeline.encode_prompt(prompt, negative_prompt, do_cfg=True).embeds


def plain_clip(upscaler, text: str) -> torch.Tensor:
    """The text through the tokenizer and text encoder with no syntax at all (diffusers' way)."""
    pipeline = upscaler.pipeline
    ids = pipeline.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return pipeline.text_encoder(ids.input_ids)[0]


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# --- A1111 weighting syntax ---------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a cat", [[("a cat", 1.0)]]),
        ("a (cat:1.5) dog", [[("a ", 1.0), ("cat", 1.5), (" dog", 1.0)]]),
        ("(cat)", [[("cat", 1.1)]]),
        ("((cat))", [[("cat", 1.1 * 1.1)]]),
        ("[cat]", [[("cat", 1 / 1.1)]]),
        ("((cat:1.5) dog:0.5)", [[("cat", 0.75), (" dog", 0.5)]]),
        (r"\(cat\) \[dog\]", [[("(cat) [dog]", 1.0)]]),
        ("(cat:abc)", [[("cat:abc", 1.1)]]),  # not a number: literal, as A1111 reads it
        ("(cat:info)", [[("cat:info", 1.1)]]),
        ("(cat:2e-1)", [[("cat", 0.2)]]),  # an exponent is a number, as in LoRA tags
        ("(cat:-100) ((dog:10):10)", [[("cat", -100.0), (" ", 1.0), ("dog", 100.0)]]),  # the limits themselves
        ("cat) dog]", [[("cat) dog]", 1.0)]]),  # brackets that close nothing are text
        ("(cat, dog", [[("cat, dog", 1.1)]]),  # an unclosed bracket runs to the end
        ("(cat:1.0) dog", [[("cat dog", 1.0)]]),
        ("a cat BREAK a dog", [[("a cat", 1.0)], [("a dog", 1.0)]]),
        ("", [[("", 1.0)]]),
    ],
)
def test_a1111_weighting_is_parsed(text, expected):
    parsed = parse_weighting(text, "prompt")
    assert [[(t, pytest.approx(w)) for t, w in segment] for segment in parsed] == expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["cat", "dog", "a long phrase", ",", ".", " ", "(", ")", "[", "]", ":0.5)",
                                 ":1.3)", "\\(", "\\]", "BREAK", ":", "<", "é", "日本"]), max_size=150),
       st.lists(st.sampled_from(["ugly", "(", ":0.2)", " ", ","]), max_size=20))
def test_any_prompt_in_the_syntax_encodes_to_whole_windows(upscaler, prompt_pieces, negative_pieces):
    embeds = encode(upscaler, " ".join(prompt_pieces), "".join(negative_pieces))
    assert embeds.shape[0] == 2 and embeds.shape[1] % 77 == 0 and torch.isfinite(embeds).all()


def test_a_malformed_weight_number_is_an_error_naming_the_field():
    with pytest.raises(ParamError, match="1.2.3") as caught:
        parse_weighting("(cat:1.2.3)", "negative_prompt")
    assert caught.value.param == "negative_prompt"


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
@pytest.mark.parametrize("text", ["(cat:nan)", "(cat: NaN )", "(cat:inf)", "(cat:-Infinity)", "(cat:1e999)",
                                  "(cat:1e5)", "(cat:100.5)", "(cat:" + "9" * 400 + ")", "((cat:90):90)",
                                  "(" * 49 + "cat", "<lora:x:nan>", "<lora:x:1:inf>"])
def test_non_finite_or_huge_weights_are_errors_naming_the_field(text, field):
    # Read as text or taken as weights, these gave NaN or overflowing embeddings: an image of
    # noise, or a failed upscale (1e30 made the tiny model's attention overflow into NaN pixels).
    with pytest.raises(ParamError, match="from -100 to 100") as caught:
        split_lora_tags(text, field) if "<lora" in text else parse_weighting(text, field)
    assert caught.value.param == field and len(caught.value.message) < 200


def test_a_non_finite_weight_fails_the_upscale_before_any_work(upscaler):
    events = []
    with pytest.raises(ParamError, match="weight") as caught:
        upscaler.upscale(make_test_image(32, 32), negative_prompt="(blurry:nan)", progress=events.append)
    assert caught.value.param == "negative_prompt" and events == []


def test_weights_change_the_embeddings_and_weight_one_changes_nothing(upscaler):
    plain = encode(upscaler, "a red house")
    assert torch.allclose(encode(upscaler, "a (red:1.0) house"), plain, atol=1e-5)
    assert (encode(upscaler, "a (red:1.5) house") - plain).abs().max() > 1e-2
    assert (encode(upscaler, "a [red] house") - plain).abs().max() > 1e-3
    assert torch.allclose(encode(upscaler, "a ((red)) house"), encode(upscaler, "a (red:1.21) house"), atol=1e-5)


def test_plain_and_escaped_text_is_encoded_exactly_as_diffusers_does(upscaler):
    embeds = encode(upscaler, r"a \(red\) house", "blurry")
    assert torch.allclose(embeds[1], plain_clip(upscaler, "a (red) house")[0], atol=1e-5)
    assert torch.allclose(embeds[0], plain_clip(upscaler, "blurry")[0], atol=1e-5)


def test_the_default_negative_prompt_keeps_the_originals_weighting(upscaler):
    from clarity.params import DEFAULT_NEGATIVE_PROMPT

    assert DEFAULT_NEGATIVE_PROMPT == "(worst quality, low quality, normal quality:2)"
    words = "worst quality, low quality, normal quality"
    assert (encode(upscaler, "x", DEFAULT_NEGATIVE_PROMPT)[0] - plain_clip(upscaler, words)[0]).abs().max() > 1e-2


# --- long prompts -------------------------------------------------------------------------

def test_prompts_over_77_tokens_are_not_cut(upscaler):
    # The tiny tokenizer makes one token per character: this prompt is about 200 tokens.
    long = ", ".join(["a tall tree"] * 15)
    image = make_test_image(64, 64)
    first = upscaler.upscale(image, prompt=long + ", red sky", negative_prompt="blurry", **RUN)
    second = upscaler.upscale(image, prompt=long + ", green sea", negative_prompt="blurry", **RUN)
    assert first.stats.passes[0].prompt_windows == 3
    # The words after token 154 reach the UNet (cut at 77, both outputs would be equal).
    assert np.abs(pixels(first.image) - pixels(second.image)).mean() > 0.01
    red, green = encode(upscaler, long + ", red sky", "blurry"), encode(upscaler, long + ", green sea", "blurry")
    # The short negative prompt is padded to the positive's three windows; only the last window differs.
    assert red.shape[:2] == (2, 3 * 77)
    assert torch.equal(red[:, : 2 * 77], green[:, : 2 * 77])
    assert (red[1, 2 * 77:] - green[1, 2 * 77:]).abs().max() > 1e-2


# --- LoRAs ----------------------------------------------------------------------------------

def test_lora_tags_are_split_off_the_text():
    text, tags = split_lora_tags("a cat <lora:more_details:0.5>, <lora:style:0.8:1.2> <lora:x>", "prompt")
    assert text == "a cat ,  "
    assert [(t.name, t.text_encoder_weight, t.unet_weight) for t in tags] == [
        ("more_details", 0.5, 0.5), ("style", 0.8, 1.2), ("x", 1.0, 1.0)]
    with pytest.raises(ParamError, match="not a number"):
        split_lora_tags("<lora:x:strong>", "prompt")
    with pytest.raises(ParamError, match="not supported"):
        split_lora_tags("<hypernet:x:1>", "prompt")


def test_a_lora_changes_the_output_by_its_weight_and_leaves_no_trace(upscaler, prompt_upscaler):
    image = make_test_image(64, 64)
    # `upscaler` never loads a LoRA: its output is the true no-LoRA result.
    without = pixels(upscaler.upscale(image, prompt="a house", **RUN).image)

    at_zero = prompt_upscaler.upscale(image, prompt="a house <lora:tiny.detail.v1:0>", **RUN)
    assert np.array_equal(pixels(at_zero.image), without)
    applied = prompt_upscaler.upscale(image, prompt="a house <lora:tiny.detail.v1:0.8>", **RUN)
    assert applied.stats.passes[0].loras == {"tiny.detail.v1": (0.8, 0.8)}
    assert np.abs(pixels(applied.image) - without).mean() > 0.5
    stronger = prompt_upscaler.upscale(image, prompt="a house <lora:tiny.detail.v1:1.5>", **RUN)
    assert np.abs(pixels(stronger.image) - without).mean() > np.abs(pixels(applied.image) - without).mean()

    # The next request without the tag is the no-LoRA result again.
    after = prompt_upscaler.upscale(image, prompt="a house", **RUN)
    assert after.stats.passes[0].loras == {}
    assert np.array_equal(pixels(after.image), without)


def test_lora_weights_apply_per_model(upscaler, prompt_upscaler):
    plain = encode(upscaler, "a house")
    # Text encoder weight 0: the embeddings are the plain ones; weight 1: they change.
    assert torch.allclose(encode(prompt_upscaler, "a house <lora:tiny.detail.v1:0:1>"), plain, atol=1e-5)
    assert (encode(prompt_upscaler, "a house <lora:tiny.detail.v1:1:0>") - plain).abs().max() > 1e-2
    # A tag in the negative prompt loads the LoRA too (both guidance branches share the model).
    assert (encode(prompt_upscaler, "a house", "<lora:tiny.detail.v1:1>") - plain).abs().max() > 1e-2
    assert torch.allclose(encode(prompt_upscaler, "a house"), plain, atol=1e-5)


def test_loras_that_train_only_the_unet_or_only_the_text_encoder_work_alone_and_together(
    tiny_weights, adapters_dir, upscaler
):
    # A fresh upscaler, so that the text-encoder-only LoRA is the first one its UNet sees.
    fresh = Upscaler.from_pretrained(tiny_weights, device="cpu", lora_dir=adapters_dir / "loras")
    plain = encode(upscaler, "a house")
    assert (encode(fresh, "a house <lora:te_only:1>") - plain).abs().max() > 1e-2
    assert torch.allclose(encode(fresh, "a house <lora:unet_only:1>"), plain, atol=1e-5)
    both = encode(fresh, "a house <lora:te_only:1> <lora:unet_only:1>")
    assert torch.allclose(both, encode(fresh, "a house <lora:te_only:1>"), atol=1e-5)
    image = make_test_image(32, 32)
    without = pixels(upscaler.upscale(image, prompt="a house", **RUN).image)
    assert np.abs(pixels(fresh.upscale(image, prompt="a house <lora:unet_only:1>", **RUN).image) - without).mean() > 0.5
    assert np.array_equal(pixels(fresh.upscale(image, prompt="a house", **RUN).image), without)


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
@pytest.mark.parametrize("name", ["nope", "../outside", "loras/tiny.detail.v1", "/etc/passwd"])
def test_unknown_or_outside_lora_names_are_errors_listing_the_available_ones(prompt_upscaler, field, name):
    texts = {"prompt": "a house", "negative_prompt": "", field: f"a house <lora:{name}:0.5>"}
    with pytest.raises(ParamError) as caught:
        prompt_upscaler.pipeline.encode_prompt(texts["prompt"], texts["negative_prompt"], do_cfg=True)
    assert caught.value.param == field
    assert f"no LoRA named {name!r}" in caught.value.message
    assert "available: broken, te_only, tiny.detail.v1, unet_only" in caught.value.message


@pytest.mark.parametrize(("prompt", "message"), [("a <lora:nope:1>", "no LoRA named"), ("(a:1.2.3)", "not a number")])
def test_a_bad_prompt_fails_before_any_work_even_when_no_pass_would_read_it(prompt_upscaler, prompt, message):
    events = []
    with pytest.raises(ParamError, match=message) as caught:
        # creativity 0: no denoising step, so no pass ever encodes the prompt.
        prompt_upscaler.upscale(make_test_image(32, 32), prompt=prompt, creativity=0.0, progress=events.append)
    assert caught.value.param == "prompt" and events == []


def test_lora_tags_without_a_lora_folder_say_so(upscaler):
    with pytest.raises(ParamError, match="no LoRA folder is configured"):
        encode(upscaler, "<lora:tiny.detail.v1:1>")


def test_an_unreadable_lora_file_is_a_weights_error_naming_it(prompt_upscaler):
    with pytest.raises(WeightsError, match="broken.safetensors"):
        encode(prompt_upscaler, "<lora:broken:1>")
    assert prompt_upscaler.upscale(make_test_image(32, 32), **RUN).stats.passes[0].loras == {}


# --- textual-inversion embeddings -----------------------------------------------------------

def test_an_embedding_named_in_the_negative_prompt_changes_the_output(upscaler, prompt_upscaler):
    image = make_test_image(64, 64)
    common = {"prompt": "a house", **RUN}
    text_only = upscaler.upscale(image, negative_prompt="easyneg, blurry", **common)
    embedded = prompt_upscaler.upscale(image, negative_prompt="easyneg, blurry", **common)
    assert embedded.stats.passes[0].embeddings == ["easyneg"]
    assert text_only.stats.passes[0].embeddings == []
    assert np.abs(pixels(embedded.image) - pixels(text_only.image)).mean() > 0.1


def test_without_the_file_an_embedding_name_is_just_text(upscaler, prompt_upscaler):
    assert torch.allclose(encode(upscaler, "x", "easyneg")[0], plain_clip(upscaler, "easyneg")[0], atol=1e-5)
    # Only whole words are names: "easynegative" is text even where easyneg exists.
    assert torch.allclose(encode(prompt_upscaler, "x", "easynegative")[0], plain_clip(upscaler, "easynegative")[0],
                          atol=1e-5)


def test_an_embedding_for_another_model_is_a_weights_error_naming_it(prompt_upscaler):
    with pytest.raises(WeightsError, match="otherwidth.safetensors"):
        encode(prompt_upscaler, "a house", "otherwidth")


def test_a1111_pt_embeddings_with_several_vectors_work_and_can_be_weighted(prompt_upscaler):
    pipeline = prompt_upscaler.pipeline
    encoded = pipeline.encode_prompt("a house", "badpt", do_cfg=True)
    assert encoded.embeddings == ["badpt"]
    # Three vectors: three tokens after the start token.
    ids = pipeline.tokenizer(pipeline.maybe_convert_prompt("<badpt>", pipeline.tokenizer)).input_ids
    assert len(ids) == 2 + 3
    weighted = pipeline.encode_prompt("a house", "(badpt:1.4)", do_cfg=True).embeds
    assert (weighted[0] - encoded.embeds[0]).abs().max() > 1e-2

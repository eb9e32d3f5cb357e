"""The CLIP tokenizers single-file checkpoints load with, built locally: no download.

A single-file checkpoint holds no tokenizer, only the text encoder's token embedding, whose
row count tells which vocabulary it was trained on: SD1.5's CLIP ViT-L/14 tokenizer (built
from the BPE merges shipped in `configs/`), or the byte-level one of the tiny test model
(`clarity.testing.tiny`), whose checkpoint must load through the same code as real ones.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

from clarity.errors import WeightsError

#: OpenAI CLIP's BPE merges, shipped with the package (see configs/README.md).
CLIP_MERGES_FILE = Path(__file__).with_name("configs") / "bpe_simple_vocab_16e6.txt.gz"
#: Vocabulary size of CLIP ViT-L/14's tokenizer, SD1.5's.
CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode() -> list[str]:
    """CLIP's (and GPT-2's) byte → printable character table, in CLIP's vocabulary order.

    Written out because the order matters for token ids and no installed library exposes it
    in this order (tokenizers' `ByteLevel.alphabet()` is a set).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


@lru_cache(maxsize=1)
def _clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.decompress(CLIP_MERGES_FILE.read_bytes()).decode("utf-8").split("\n")
    # CLIP uses the first 49152 - 256 - 2 merges (line 0 is a version header).
    merges = [tuple(line.split()) for line in lines[1 : CLIP_VOCAB_SIZE - 2 * 256 - 2 + 1]]
    chars = _bytes_to_unicode()
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges), "<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def clip_tokenizer(model_max_length: int = 77):
    """The CLIP ViT-L/14 tokenizer (SD1.5's), built from the shipped BPE merges: no download."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocabulary()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


def byte_level_tokenizer():
    """A CLIP tokenizer whose BPE vocabulary has no merges: every byte is its own token.

    The tiny test model's tokenizer: a stand-in for the 49408-token CLIP vocabulary that keeps
    the tiny text encoder's embedding small; it loads through the same `CLIPTokenizer` class
    and tokenises any text, one token per byte.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    byte_chars = sorted(ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>", *byte_chars, *(c + "</w>" for c in byte_chars)]
    # Without model_max_length the pipeline would pad prompts to an effectively unlimited length.
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def tokenizer_for_vocabulary(path: Path, vocab_size: int, model_max_length: int):
    """The tokenizer of a text encoder with `vocab_size` tokens (from checkpoint `path`); `WeightsError` if none."""
    if vocab_size == CLIP_VOCAB_SIZE:
        return clip_tokenizer(model_max_length)
    tiny = byte_level_tokenizer()
    if vocab_size == len(tiny):
        return tiny
    raise WeightsError(
        f"{path}: its text encoder has a {vocab_size}-token vocabulary; SD1.5's CLIP tokenizer has {CLIP_VOCAB_SIZE}."
    )

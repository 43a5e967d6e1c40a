"""Helpers of the statistics tests: a word-level tokenizer and example files."""

from __future__ import annotations

from pathlib import Path

WORDS = [f"w{i}" for i in range(100)]


def save_tokenizer(folder: Path, arch: str) -> None:
    """A word-level tokenizer over ``WORDS`` (ids < the tiny models' vocab of 128)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {t: i for i, t in enumerate(special + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(folder)


def texts_file(tmp: Path, n: int = 12, labels: bool = False) -> Path:
    import json
    import random

    rng = random.Random(0)
    rows = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]
    if labels:
        p = tmp / "texts.jsonl"
        p.write_text("".join(json.dumps({"text": r, "label": i % 2}) + "\n"
                             for i, r in enumerate(rows)))  # fmt: skip
    else:
        p = tmp / "texts.txt"
        p.write_text("\n".join(rows) + "\n")
    return p

"""A model folder's tokenizer: which files it has, its vocabulary, and its vocabulary size.

Two ways to read one. :func:`read_token_ids` parses ``tokenizer.json`` alone (token -> id,
added tokens included; no ``transformers``), enough to tell whether two models number their
tokens alike. :func:`load_tokenizer` loads the tokenizer with ``transformers`` (fast, never
remote code), as a vocabulary merge needs it: to build the output tokenizer and write it. Every
error names the model, its folder and the file, and says what to do.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergeforge.errors import CheckpointError

TOKENIZER_MODEL_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
)
"""The files that hold a vocabulary (one of them makes a tokenizer loadable); the other
tokenizer files (``tokenizer_config.json``, ``special_tokens_map.json``) only configure one."""


def tokenizer_file(folder: Path | None) -> Path | None:
    """The first of :data:`TOKENIZER_MODEL_FILES` in ``folder``; ``None`` if it has none."""
    if folder is None:
        return None
    return next((folder / n for n in TOKENIZER_MODEL_FILES if (folder / n).is_file()), None)


def vocab_size_key(config: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Where a model config keeps its vocabulary size: ``vocab_size``, or
    ``text_config.vocab_size`` for the multimodal configs that nest it."""
    config = config or {}
    if "vocab_size" not in config and isinstance(config.get("text_config"), Mapping):
        if "vocab_size" in config["text_config"]:
            return ("text_config", "vocab_size")
    return ("vocab_size",)


def config_vocab_size(config: Mapping[str, Any] | None) -> int | None:
    """The embedding rows a model config declares (:func:`vocab_size_key`), or ``None``."""
    value: Any = config or {}
    for k in vocab_size_key(config):
        value = value.get(k) if isinstance(value, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_token_ids(folder: Path | None) -> dict[str, int] | None:
    """token -> id of ``folder/tokenizer.json`` (its model's vocabulary and its added tokens),
    or ``None`` when there is no such file or it cannot be read as one."""
    if folder is None or not (folder / "tokenizer.json").is_file():
        return None
    try:
        doc = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    vocab = (doc.get("model") or {}).get("vocab")
    if isinstance(vocab, list):  # unigram: [[piece, score], ...]
        vocab = {str(x[0]) if isinstance(x, list) else str(x): i for i, x in enumerate(vocab)}
    if not isinstance(vocab, dict):
        return None
    ids = dict(vocab)
    for t in doc.get("added_tokens") or []:
        if isinstance(t, dict) and "content" in t and isinstance(t.get("id"), int):
            ids[t["content"]] = t["id"]
    return ids


def load_tokenizer(folder: Path, model: str) -> Any:
    """The tokenizer of model folder ``folder`` (named ``model`` in errors), loaded with
    ``transformers.AutoTokenizer`` (fast; never remote code). A :class:`CheckpointError` names
    the folder and the missing or unreadable file."""
    found = tokenizer_file(folder)
    if found is None:
        raise CheckpointError(
            f"{model}: no tokenizer in {folder} (missing tokenizer.json; looked for "
            f"{', '.join(TOKENIZER_MODEL_FILES)}). Copy the tokenizer files the model was "
            "trained with into that folder."
        )
    import transformers

    try:
        generic = _generic_backend(folder)
        if generic is not None:
            return generic.from_pretrained(str(folder), local_files_only=True)
        return transformers.AutoTokenizer.from_pretrained(
            str(folder), use_fast=True, trust_remote_code=False, local_files_only=True
        )
    except Exception as e:  # transformers raises many kinds; all mean "cannot load"
        raise CheckpointError(
            f"{model}: the tokenizer in {folder} cannot be loaded ({found.name} and "
            f"tokenizer_config.json): {type(e).__name__}: {e}. Fix or re-download those files."
        ) from None


def copy_tokenizer(tokenizer: Any, edit_json=None) -> Any:
    """A fresh copy of ``tokenizer`` (saved and loaded again, so changing it leaves the
    original alone); ``edit_json(doc)`` may change its ``tokenizer.json`` in between."""
    with tempfile.TemporaryDirectory(prefix="mergeforge-tokenizer-") as d:
        tokenizer.save_pretrained(d)
        if edit_json is not None:
            p = Path(d) / "tokenizer.json"
            doc = json.loads(p.read_text(encoding="utf-8"))
            edit_json(doc)
            p.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
        return type(tokenizer).from_pretrained(d, local_files_only=True)


def _generic_backend(folder: Path) -> Any:
    """``transformers.TokenizersBackend`` when ``AutoTokenizer`` would load ``folder`` with it
    anyway, else None (then ``AutoTokenizer`` decides). That is the case of a
    ``tokenizer.json`` whose ``tokenizer_config.json`` declares the generic class
    (``TokenizersBackend`` or ``PreTrainedTokenizerFast``, the same class in transformers 5)
    with no ``auto_map``, for a ``model_type`` transformers does not send to Mistral's backend
    or list as declaring a wrong class (``AutoTokenizer.from_pretrained``'s branches for a
    declared generic class all end in ``TokenizersBackend``). Why: ``AutoTokenizer`` first loads
    the model's config class, whose import pulls in ``torch.distributed.tensor`` (~1 s of a
    merge's start-up); the class itself loads in ~30 ms."""
    try:
        tok_cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        model_cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not (folder / "tokenizer.json").is_file() or not isinstance(tok_cfg, dict):
        return None
    declared = tok_cfg.get("tokenizer_class")
    if declared not in ("TokenizersBackend", "PreTrainedTokenizerFast") or "auto_map" in tok_cfg:
        return None
    model_type = model_cfg.get("model_type") if isinstance(model_cfg, dict) else None
    if not isinstance(model_type, str) or not model_type:
        return None
    try:
        from transformers import TokenizersBackend
    except ImportError:  # another transformers: let AutoTokenizer decide
        return None
    return TokenizersBackend if _declared_generic_honoured(model_type) else None


GENERIC_DECISIONS = "transformers-generic-tokenizer-{version}.json"
"""The file under the cache home (``mergeforge.cache``) that keeps, per ``transformers``
version, which model types :func:`_declared_generic_honoured` answered for."""


def _declared_generic_honoured(model_type: str) -> bool:
    """Whether ``AutoTokenizer`` loads a tokenizer that declares the generic class as that class
    for ``model_type`` (not listed as declaring a wrong class, not sent to Mistral's backend).
    The answer is a fact of the installed ``transformers`` (two tables of
    ``transformers.models.auto.tokenization_auto``), but importing that module costs ~0.45 s
    of every merge that reads a tokenizer; so each answer is kept in the cache home, keyed by
    the ``transformers`` version, and read back (~1 ms) by later runs. An unreadable or
    unwritable cache only means importing the module again."""
    import transformers

    from mergeforge.cache import cache_home

    path = cache_home() / GENERIC_DECISIONS.format(version=transformers.__version__)
    known: dict[str, bool] = {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(doc, dict):
            known = {k: v for k, v in doc.items() if isinstance(v, bool)}
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    if model_type in known:
        return known[model_type]
    try:
        from transformers.models.auto import tokenization_auto as auto
    except ImportError:
        return False
    incorrect = getattr(auto, "MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS", None)
    registered = getattr(auto, "TOKENIZER_MAPPING_NAMES", {}).get(model_type) or ""
    honoured = not (incorrect is None or model_type in incorrect or "Mistral" in registered)
    if incorrect is not None:
        from mergeforge.checkpoint.atomic import write_text_atomic

        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps({**known, model_type: honoured}, indent=1,
                                               sort_keys=True))  # fmt: skip
    return honoured


def strip_tokenizer(tokenizer: Any, vocab_size: int, model: str) -> Any:
    """``tokenizer`` without the tokens whose id is ``vocab_size`` or more (tokens the model has
    no embedding row for), or ``tokenizer`` itself when it has none. Works on the vocabulary of
    ``tokenizer.json`` (BPE, WordPiece, WordLevel, Unigram); a BPE merge that uses a removed
    token goes too."""
    unused = {t for t, i in tokenizer.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise CheckpointError(
            f"{model}: its tokenizer has {len(unused)} tokens past its vocab_size {vocab_size} "
            "and no tokenizer.json to remove them from; add a tokenizer.json (a fast tokenizer)."
        )

    def edit(doc: dict) -> None:
        doc["added_tokens"] = [t for t in doc.get("added_tokens") or [] if t["id"] < vocab_size]
        m = doc.get("model") or {}
        vocab = m.get("vocab")
        if isinstance(vocab, dict):
            m["vocab"] = {t: i for t, i in vocab.items() if i < vocab_size}
        elif isinstance(vocab, list):
            m["vocab"] = vocab[:vocab_size]
        if isinstance(m.get("merges"), list):
            m["merges"] = [
                x for x in m["merges"]
                if not any(p in unused for p in (x.split(" ") if isinstance(x, str) else x))
            ]  # fmt: skip

    return copy_tokenizer(tokenizer, edit)

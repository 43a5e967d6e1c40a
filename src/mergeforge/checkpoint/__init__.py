"""Read and write weights: lazy safetensors (single/sharded), torch ``.bin`` (weights_only),
Hugging Face folders, PEFT LoRA adapters as deltas; atomic streaming sharded safetensors writer."""

from mergeforge.checkpoint.base import Checkpoint, TensorInfo, TensorSource
from mergeforge.checkpoint.hf import SIDE_FILES
from mergeforge.checkpoint.loader import (
    CheckpointSummary,
    inspect_checkpoint,
    open_checkpoint,
    summarize,
)
from mergeforge.checkpoint.writer import ShardedWriter

__all__ = [
    "SIDE_FILES",
    "Checkpoint",
    "CheckpointSummary",
    "ShardedWriter",
    "TensorInfo",
    "TensorSource",
    "inspect_checkpoint",
    "open_checkpoint",
    "summarize",
]

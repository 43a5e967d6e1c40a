"""Read and write weights: lazy safetensors (single/sharded), torch ``.bin`` (weights_only),
Hugging Face folders, PEFT LoRA adapters as deltas; atomic streaming sharded safetensors writer;
state dicts in memory as a source (``MemorySource``) and a sink (``MemorySink``)."""

from mergeforge.checkpoint.base import Checkpoint, TensorInfo, TensorSource
from mergeforge.checkpoint.hf import CARRIED_FILES
from mergeforge.checkpoint.loader import (
    CheckpointSummary,
    inspect_checkpoint,
    open_checkpoint,
    summarize,
)
from mergeforge.checkpoint.memory import MemorySink, MemorySource, memory_checkpoint
from mergeforge.checkpoint.writer import ShardedWriter

__all__ = [
    "CARRIED_FILES",
    "Checkpoint",
    "CheckpointSummary",
    "MemorySink",
    "MemorySource",
    "ShardedWriter",
    "TensorInfo",
    "TensorSource",
    "inspect_checkpoint",
    "memory_checkpoint",
    "open_checkpoint",
    "summarize",
]

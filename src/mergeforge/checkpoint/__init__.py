"""Read and write weights: lazy safetensors (single/sharded), torch ``.bin`` (weights_only),
Hugging Face folders, PEFT LoRA adapters as deltas; atomic streaming sharded safetensors writer."""

from mergeforge.checkpoint.base import Checkpoint, TensorInfo, TensorSource

__all__ = ["Checkpoint", "TensorInfo", "TensorSource"]

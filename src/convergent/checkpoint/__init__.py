"""Reading and writing checkpoints: lazy sources in, sharded safetensors out."""

from convergent.checkpoint.reader import Checkpoint, open_checkpoint
from convergent.checkpoint.source import TensorInfo, TensorSource
from convergent.checkpoint.writer import AtomicOutput, ShardedWriter
from convergent.durable import sha256_file

__all__ = [
    "AtomicOutput",
    "Checkpoint",
    "ShardedWriter",
    "TensorInfo",
    "TensorSource",
    "open_checkpoint",
    "sha256_file",
]

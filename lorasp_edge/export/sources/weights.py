"""Key -> tensor views of a model's weights: what a source hands the writers that read weights by
checkpoint key (the GGUF file, the streamed ONNX graph), whether the weights are in memory or on disk.

    keys()       checkpoint keys, in the checkpoint's order (a tied output head may be absent)
    shape(key)   the tensor's shape, without reading it
    read(key)    the tensor: fp32 for floating-point weights (a fresh copy from disk, or the model's own
                 tensor in memory, which the caller must not change)
"""

from __future__ import annotations

from pathlib import Path

import torch


class ModelWeights:
    """The weights of a model in memory (its state dict: no copy)."""

    def __init__(self, model):
        self.state = model.state_dict()

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)

    def read(self, key: str) -> torch.Tensor:
        tensor = self.state[key].detach()
        return tensor.float() if tensor.is_floating_point() else tensor

    def close(self) -> None:
        self.state = {}


class FolderWeights:
    """The weights of a safetensors folder (the merged HF folder), read one tensor at a time."""

    def __init__(self, folder: Path):
        from lorasp_edge.export.sources.shards import Checkpoint

        self.checkpoint = Checkpoint(folder)

    def keys(self) -> list[str]:
        return self.checkpoint.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.checkpoint.shape(key)

    def read(self, key: str) -> torch.Tensor:
        tensor = self.checkpoint.read(key)
        return tensor.float() if tensor.is_floating_point() else tensor

    def close(self) -> None:
        self.checkpoint.close()

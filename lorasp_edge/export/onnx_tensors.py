"""Where the decoder graph's initializers come from and how they are written, one tensor at a time.

    weights.read(key) (fp32, checkpoint key: a model in memory or safetensors shards on disk)
        --linear weight (out, in)--> MatMul's (in, out), or MatMulNBits' blocks (quantize.py)
        --ExternalData.add--> a TensorProto: inline, or appended to model.onnx_data and referenced

Nothing here holds more than the tensor being written, so the same code serves a model in memory and
a merged model streamed from disk that is larger than the machine's memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ALIGNMENT = 4096  # external tensors page-aligned, so onnxruntime may map them in place
INLINE_BYTES = 1024  # onnx.save_model's default size_threshold: smaller tensors stay in the graph


class ModelWeights:
    """The weights source of a model in memory: its state dict by checkpoint key, as fp32."""

    def __init__(self, model: torch.nn.Module):
        self.state = model.state_dict()

    def keys(self) -> list[str]:
        return list(self.state)

    def read(self, key: str) -> torch.Tensor:
        return self.state[key].detach().float()


class ExternalData:
    """Initializers appended one by one to an external data file (or kept inline when `path` is None)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.handle = open(path, "wb") if path is not None else None  # noqa: SIM115 (closed by close())
        self.offset = 0

    def add(self, name: str, array: np.ndarray):
        """A TensorProto named `name` holding `array`."""
        from onnx import TensorProto, helper

        array = np.asarray(array, order="C")  # (np.ascontiguousarray would make a scalar 1-D)
        tensor = TensorProto()
        tensor.name = name
        tensor.dims.extend(int(d) for d in array.shape)
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        # Small tensors stay inline, as onnx.save's size_threshold keeps them: onnxruntime's shape
        # inference reads a Reshape's shape initializer and cannot from external data.
        if self.handle is None or array.nbytes < INLINE_BYTES:
            tensor.raw_data = array.tobytes()
            return tensor
        pad = -self.offset % ALIGNMENT
        self.handle.write(b"\0" * pad)
        start = self.offset + pad
        self.handle.write(memoryview(array).cast("B"))
        self.offset = start + array.nbytes
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def matmul_weight(weights: list[torch.Tensor]) -> np.ndarray:
    """nn.Linear weights (out, in), concatenated along out, as MatMul's right operand (in, out)."""
    return torch.cat(weights).t().contiguous().numpy()


def stored_bytes(shapes: list[tuple[int, int]], bits: int | None, block_size: int) -> int:
    """Bytes the linear weights of these (out, in) shapes take in the graph at `bits` (None: fp32)."""
    from lorasp_edge.export.quantize import quantized_bytes

    if bits is None:
        return sum(4 * rows * cols for rows, cols in shapes)
    return sum(quantized_bytes(rows, cols, bits, block_size) for rows, cols in shapes)

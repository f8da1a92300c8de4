"""Where the decoder graph's tensors come from and how they are written, one tensor at a time.

    weights.read(key) (fp32, checkpoint key: export/sources/weights.py, a model in memory or safetensors shards on disk)
        --linear weight (out, in)--> MatMul's (in, out), or MatMulNBits' blocks (quantize.py)
        --GraphWriter.tensor--> ExternalData.add: a TensorProto, inline or appended to model.onnx_data

Nothing here holds more than the tensor being written, so the same code serves a model in memory and
a merged model streamed from disk that is larger than the machine's memory. `GraphWriter` collects
the nodes that read them (onnx_build.py, onnx_vocab.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

MS = "com.microsoft"  # the domain of onnxruntime's contrib operators
ALIGNMENT = 4096  # external tensors page-aligned, so onnxruntime may map them in place
INLINE_BYTES = 1024  # onnx.save_model's default size_threshold: smaller tensors stay in the graph


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


class GraphWriter:
    """Nodes and initializers of one graph; weights go through `ExternalData` as they are added."""

    def __init__(self, data: ExternalData):
        self.data = data
        self.nodes: list = []
        self.initializers: list = []
        self.value_info: list = []
        self.constants: set[str] = set()

    def add(self, op: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "", **attributes) -> list[str]:
        from onnx import helper

        names = outputs if isinstance(outputs, list) else [f"{name}/output_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=name, domain=domain, **attributes))
        return names

    def one(self, op: str, inputs: list[str], name: str, domain: str = "", **attributes) -> str:
        return self.add(op, inputs, name, 1, domain, **attributes)[0]

    def typed(self, name: str, element_type: int, dims: list) -> str:
        """Declares `name`'s type: onnx's shape inference cannot follow the contrib operators, and a
        graph cut at layer boundaries (onnx_slices.py) needs the type of every tensor that crosses one."""
        from onnx import helper

        self.value_info.append(helper.make_tensor_value_info(name, element_type, dims))
        return name

    def tensor(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.data.add(name, array))
        return name

    def constant(self, value, dtype=np.int64) -> str:
        """A small constant (a shape, an axis), written once however often it is used."""
        array = np.array(value, dtype)
        name = f"const.{array.dtype.name}.{'x'.join(map(str, array.shape)) or 'scalar'}.{'_'.join(map(str, array.ravel().tolist()))}"
        if name not in self.constants:
            self.constants.add(self.tensor(name, array))
        return name


def matmul_weight(weights: list[torch.Tensor]) -> np.ndarray:
    """nn.Linear weights (out, in), concatenated along out, as MatMul's right operand (in, out)."""
    return torch.cat(weights).t().contiguous().numpy()


def stored_bytes(shapes: list[tuple[int, int]], bits: int | None, block_size: int) -> int:
    """Bytes the linear weights of these (out, in) shapes take in the graph at `bits` (None: fp32)."""
    from lorasp_edge.export.quantize import quantized_bytes

    if bits is None:
        return sum(4 * rows * cols for rows, cols in shapes)
    return sum(quantized_bytes(rows, cols, bits, block_size) for rows, cols in shapes)

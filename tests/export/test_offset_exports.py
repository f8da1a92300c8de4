"""An adapter trained from the offset start exports like any other: the merge, ONNX (verified by
onnxruntime) and llama.cpp's LoRA file all carry B A - B0 A0."""

from __future__ import annotations

import gguf
import numpy as np
import torch
from tiny import make_model_dir, train_adapter

from lorasp_edge.export import gguf_adapter
from lorasp_edge.export.sources.adapter import unmerged_base
from lorasp_edge.export.sources.merge import merged_model
from lorasp_edge.export.run import ExportSettings, export
from lorasp_edge.models import load_model
from lorasp_edge.train.adapter_files import load_adapter


def test_offset_adapter_exports_verified_onnx_and_a_lora_gguf_of_the_delta(tmp_path):
    base = make_model_dir(tmp_path / "base", "llama", initializer_range=0.2)
    adapter = train_adapter(base, tmp_path / "adapter", steps=10, init="offset")
    report = export(ExportSettings(adapter=adapter, out=tmp_path / "out", format="hf,onnx", eval_tokens=256))
    verification = report.manifest["verification"]
    assert verification["merge"]["relative_diff"] < 1e-5
    assert verification["onnx"]["relative_diff"] < 1e-5

    peft_model = load_adapter(load_model(str(base), compute_dtype=torch.float32, device="cpu"), adapter)
    merged = merged_model(peft_model).state_dict()
    plain = unmerged_base(peft_model).state_dict()
    reader = gguf.GGUFReader(gguf_adapter.write_lora_gguf(peft_model, tmp_path / "a.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    meta = {name: field.contents() for name, field in reader.fields.items()}
    assert meta["adapter.lora.alpha"] == 16.0  # held rank 8, PEFT lora_alpha 16: scale 2, as trained
    a, b = (np.asarray(tensors[f"blk.1.ffn_down.weight.lora_{part}"].data) for part in "ab")
    assert a.shape == (8, 128) and b.shape == (64, 8)  # numpy order of ggml's a [d_in, 2r], b [2r, d_out]
    delta = (merged["model.layers.1.mlp.down_proj.weight"] - plain["model.layers.1.mlp.down_proj.weight"]).numpy()
    assert np.abs(delta).max() > 1e-3  # trained: the offset does not cancel any more
    assert np.abs(2.0 * b @ a - delta).max() <= 1e-5 * np.abs(delta).max()

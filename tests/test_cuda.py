"""What only a CUDA device can show: the LoRA-SP step on the GPU keeps its frozen entries, and the
memory guard limits reserved device memory. Skipped without a GPU; `pytest -m cuda` selects them
(tools/gpu_check.py runs that as one of its sections)."""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def cuda_plan(model_dir, bits: int):
    from lorasp_edge.plan.search import plan_training

    plan = plan_training(model=str(model_dir), budget_bytes=8 * 10**9, seq_len=32, batch=4)
    compute_dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return dataclasses.replace(plan, quant_bits=bits, compute_dtype=compute_dtype, rank=8, alpha=16.0, micro_batch=2, grad_accum=2,
                               gradient_checkpointing=False, device_kind="cuda")


def micro_batches(vocab_size: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, vocab_size, (2, 32), generator=generator)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    return batches


@pytest.mark.parametrize("bits", [16, 4])
def test_lorasp_step_on_cuda_keeps_frozen_entries_and_moves_trainable_ones(model_dir, bits):
    from lorasp_edge.train.adapter import lora_matrices
    from lorasp_edge.train.loop import build_model, build_optimizer
    from lorasp_edge.train.step import train_step

    device = torch.device("cuda")
    plan = cuda_plan(model_dir, bits)
    model = build_model(plan, str(model_dir), device=device, seed=3)
    # Weight decay moves every entry a decoupled AdamW owns: the frozen ones must still not move.
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    initial = {(name, part): linear.weight.detach().clone() for name, part, linear in lora_matrices(model)}
    assert all(tensor.device.type == "cuda" for tensor in initial.values())
    vocab = model.get_base_model().config.vocab_size
    losses = [train_step(model, optimizer, micro_batches(vocab, seed), plan)["loss"] for seed in range(8)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    for name, part, linear in lora_matrices(model):
        trainable = linear.lorasp_trainable
        before, after = initial[(name, part)], linear.weight.detach()
        assert int((~trainable).sum()) == round(0.5 * trainable.numel()), f"{name}.{part}: not half frozen"
        assert torch.equal(after[~trainable], before[~trainable]), f"{name}.{part}: a frozen entry moved on CUDA"
        assert (after[trainable] != before[trainable]).all(), f"{name}.{part}: a trainable entry did not move on CUDA"


def test_memory_guard_reads_reserved_cuda_memory():
    from lorasp_edge.train.guard import MemoryGuard

    device = torch.device("cuda")
    gc.collect()  # an earlier test's model, if a reference cycle still holds it
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    # 64 MiB and one byte: the caching allocator reserves whole 2 MiB pages for it, so the reserved
    # peak lies above the allocated one.
    block = torch.empty(64 * 2**20 + 1, dtype=torch.uint8, device=device)
    allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    assert reserved > allocated >= block.numel()
    guard = MemoryGuard(budget_bytes=allocated, predicted_bytes=allocated, device=device)
    assert guard.peak_bytes() == reserved
    assert guard.measure == "reserved CUDA memory"
    assert guard.over_budget(), "a budget the allocated bytes keep must still trip on the reserved ones"
    assert "reserved CUDA memory" in guard.report(step=1)
    del block
    torch.cuda.empty_cache()  # freed and handed back, the peak stays: the guard reads the peak
    assert guard.peak_bytes() == reserved
    assert not MemoryGuard(budget_bytes=reserved, device=device).over_budget()

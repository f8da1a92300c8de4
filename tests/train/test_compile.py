"""`train --compile`: decoder layers compiled in place give the eager step's loss and gradient, and
the same state_dict keys (so checkpoints, resume and the adapter file do not change)."""

from __future__ import annotations

import dataclasses

import torch

from lorasp_edge.plan.search import plan_training
from lorasp_edge.train.loop import build_model, build_optimizer
from lorasp_edge.train.loss import ChunkedCausalLMLoss
from lorasp_edge.train.step import train_step
from tests.tiny import make_model_dir


def test_compiled_layers_train_like_eager(tmp_path):
    model_dir = make_model_dir(tmp_path / "base")
    plan = plan_training(model=str(model_dir), budget_bytes=8 * 10**9, seq_len=16, batch=2)
    plan = dataclasses.replace(plan, quant_bits=16, compute_dtype="float32", rank=4, alpha=8.0, micro_batch=2, grad_accum=1,
                               gradient_checkpointing=True)
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, 200, (2, 2, 16), generator=generator)]
    results = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build_model(plan, str(model_dir), device="cpu", seed=3, compile_layers=compiled)
        layers = model.get_base_model().model.layers
        assert [layer._compiled_call_impl is not None for layer in layers] == [compiled] * 2
        optimizer = build_optimizer(model, lr=1e-3)
        loss_module = ChunkedCausalLMLoss(model, chunk_tokens=plan.loss_chunk_tokens)
        losses = [train_step(loss_module, optimizer, [batch], plan, 1.0)["loss"] for batch in batches]
        results[compiled] = (losses, {key: value.clone() for key, value in model.state_dict().items()})
    (eager_losses, eager_state), (compiled_losses, compiled_state) = results[False], results[True]
    assert sorted(eager_state) == sorted(compiled_state)
    # The second loss follows one optimizer step on the first step's gradient: equal losses there
    # mean equal gradients too. Tolerance: fused kernels reorder fp32 sums.
    for eager, compiled in zip(eager_losses, compiled_losses):
        assert abs(eager - compiled) <= 1e-5 * abs(eager), (eager_losses, compiled_losses)
    for key, value in eager_state.items():
        torch.testing.assert_close(compiled_state[key], value, rtol=1e-4, atol=1e-6)

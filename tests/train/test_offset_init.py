"""LoRA-SP's offset start: B random (its frozen half carries information), B0 A0 subtracted.

Held as a PEFT rank-2r LoRA [B, -B0] [A; A0] (on a float32 base, folded: W0 - s B0 A0 and a
rank-r LoRA in memory, the rank-2r form on disk): the model starts as the base, the offset half
never moves, the trainable count equals the zero start's, and PEFT and the merge read it unchanged.
Every test runs both forms (`fold`).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_adapter import tiny_gpt2, tiny_llama, tokens, train

from lorasp_edge.errors import AdapterError
from lorasp_edge.export.sources.merge import merged_model
from lorasp_edge.plan import memory
from lorasp_edge.plan.catalog import model_info
from lorasp_edge.train.adapter import (
    LoRASPConfig,
    apply_lorasp,
    count_parameters,
    folded,
    held_frozen_masks,
    held_matrices,
    lora_matrices,
    redraw_masks,
    set_lora_matrices,
)
from lorasp_edge.train.adapter_files import load_adapter, read_adapter_info, save_adapter

RANK = 4
FORMS = pytest.mark.parametrize("fold", [True, False], ids=["folded", "rank-2r"])


def offset(seed=3, **changes):
    return LoRASPConfig(**{"rank": RANK, "alpha": 2.0 * RANK, "seed": seed, "init": "offset", **changes})


@FORMS
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_offset_start_is_the_base_and_b_is_random(make, fold):
    base = make()
    x = tokens()
    expected = base(x).logits
    model = apply_lorasp(copy.deepcopy(base), offset(), fold=fold)
    assert folded(model) == fold
    # [B0, -B0] [A0; A0] cancels term by term (or W0 - s B0 A0 + s B0 A0): fp32 rounding only.
    torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=1e-5)
    frozen = held_frozen_masks(model)
    for key, weight in held_matrices(model).items():
        if key.endswith("lora_A"):
            assert weight.shape[0] == 2 * RANK and torch.equal(weight[:RANK], weight[RANK:]), key
        else:
            assert weight.shape[1] == 2 * RANK and torch.equal(weight[:, :RANK], -weight[:, RANK:]), key
            live = weight[:, :RANK]
            assert (live[frozen[key][:, :RANK]] != 0).all(), f"{key}: a frozen B entry is zero"


@FORMS
def test_offset_masks_freeze_the_offset_half_and_train_as_many_entries(fold):
    zeros = apply_lorasp(tiny_llama(), LoRASPConfig(rank=RANK, alpha=2.0 * RANK, seed=3))
    model = apply_lorasp(tiny_llama(), offset(), fold=fold)
    assert count_parameters(model)["trainable"] == count_parameters(zeros)["trainable"]
    assert count_parameters(model)["lora"] == 2 * count_parameters(zeros)["lora"]
    plain = held_frozen_masks(zeros)
    for key, frozen in held_frozen_masks(model).items():
        live, held = (frozen[:RANK], frozen[RANK:]) if key.endswith("lora_A") else (frozen[:, :RANK], frozen[:, RANK:])
        assert held.all(), f"{key}: an offset entry is trainable"
        # The live half's mask is the zero start's mask: the same draw for the same seed and name.
        assert torch.equal(live, plain[key]), key


@pytest.mark.parametrize("init, fold", [("zeros", None), ("offset", True), ("offset", False)])
def test_a_learns_from_the_first_step(init, fold):
    """With B = 0, A's gradient is zero at step one; the offset start gives it one at once."""
    model = apply_lorasp(tiny_llama(), LoRASPConfig(rank=RANK, alpha=8.0, seed=3, init=init), fold=fold)
    x = tokens()
    model(x, labels=x).loss.backward()
    store = model.lorasp_store
    grads = [store.values.grad[store.value_range(slot)].abs().sum() > 0 for slot, (_, part, _) in enumerate(lora_matrices(model)) if part == "A"]
    assert all(grads) if init == "offset" else not any(grads)


@FORMS
def test_offset_adapter_saves_loads_and_peft_reads_it(tmp_path, fold):
    from peft import PeftModel

    model = apply_lorasp(tiny_llama(), offset(seed=9), fold=fold)
    train(model, steps=5)
    model.eval()
    save_adapter(model, tmp_path / "adapter", {"base_model": "tiny"})
    info = read_adapter_info(tmp_path / "adapter")
    assert (info["rank"], info["init"], info["peft_config"]["r"], info["peft_config"]["lora_alpha"]) == (RANK, "offset", 2 * RANK, 4.0 * RANK)
    loaded = load_adapter(tiny_llama(), tmp_path / "adapter")  # the rank-2r form, as the exporters load it
    x = tokens()
    ours = model(x).logits
    if fold:  # W0 - s B0 A0 + s B A against W0 + s [B, -B0][A; A0]: fp32 rounding apart
        torch.testing.assert_close(loaded(x).logits, ours, rtol=0, atol=1e-5)
    else:
        assert torch.equal(loaded(x).logits, ours)
    for key, frozen in held_frozen_masks(model).items():
        assert torch.equal(frozen, held_frozen_masks(loaded)[key]), key
    # Plain PEFT, without lorasp-edge: the offset is part of the adapter it applies.
    peft = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(peft(x).logits, ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged_model(model)(x).logits, ours, rtol=0, atol=1e-5)


def test_folded_and_rank_2r_forms_train_alike_and_share_checkpoints():
    """The fold changes where B0 A0 is computed, not what is trained: the same steps give the same
    matrices (fp32 rounding apart), and either form takes the other's held matrices (a checkpoint)."""
    runs = {True: apply_lorasp(tiny_llama(), offset(seed=5), fold=True)}
    # PEFT draws A at rank r in the folded form and at rank 2r in the other: start the other from the same matrices.
    runs[False] = apply_lorasp(tiny_llama(), offset(seed=5), fold=False)
    set_lora_matrices(runs[False], held_matrices(runs[True]))
    for model in runs.values():
        train(model, steps=6)
        model.eval()
    x = tokens()
    torch.testing.assert_close(runs[True](x).logits, runs[False](x).logits, rtol=0, atol=1e-4)
    held = {fold: held_matrices(model) for fold, model in runs.items()}
    for key in held[True]:
        torch.testing.assert_close(held[True][key], held[False][key], rtol=0, atol=1e-5)
    for fold, source in ((True, False), (False, True)):
        fresh = apply_lorasp(tiny_llama(), offset(seed=5), fold=fold).eval()
        set_lora_matrices(fresh, held[source])
        torch.testing.assert_close(fresh(x).logits, runs[source](x).logits, rtol=0, atol=1e-5)
    # A folded model given another offset (a checkpoint of another draw) folds that one in instead.
    other = apply_lorasp(tiny_llama(), offset(seed=6), fold=False)
    train(other, steps=2)
    fresh = apply_lorasp(tiny_llama(), offset(seed=5), fold=True).eval()
    set_lora_matrices(fresh, held_matrices(other))
    torch.testing.assert_close(fresh(x).logits, other.eval()(x).logits, rtol=0, atol=1e-5)


def test_fold_needs_a_float32_base():
    with pytest.raises(ValueError, match="fold=True needs the offset start on a float32 base"):
        apply_lorasp(tiny_llama().to(torch.bfloat16), offset(), fold=True)
    assert not folded(apply_lorasp(tiny_llama().to(torch.bfloat16), offset()))  # a 16-bit base keeps rank 2r


def test_offset_rank_disagreement_is_refused(tmp_path):
    model = apply_lorasp(tiny_llama(), offset())
    save_adapter(model, tmp_path / "adapter", {"base_model": "tiny"})
    record = json.loads((tmp_path / "adapter" / "lorasp.json").read_text())
    record["init"] = "zeros"
    (tmp_path / "adapter" / "lorasp.json").write_text(json.dumps(record))
    with pytest.raises(AdapterError, match="rank r=8 disagrees with lorasp.json rank=4"):
        read_adapter_info(tmp_path / "adapter")
    record["init"] = "sideways"
    (tmp_path / "adapter" / "lorasp.json").write_text(json.dumps(record))
    with pytest.raises(AdapterError, match="field 'init' must be one of zeros, offset"):
        read_adapter_info(tmp_path / "adapter")


@FORMS
def test_redraw_keeps_the_offset_frozen_and_the_output(fold):
    model = apply_lorasp(tiny_llama(), offset(redraw_every=2), fold=fold)
    train(model, steps=3)
    model.eval()
    x = tokens()
    before = model(x).logits
    redraw_masks(model, 1)
    torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)
    for key, frozen in held_frozen_masks(model).items():
        assert (frozen[RANK:] if key.endswith("lora_A") else frozen[:, RANK:]).all(), key


def test_bad_init_is_refused():
    with pytest.raises(ValueError, match="init must be one of zeros, offset, not 'random'"):
        apply_lorasp(tiny_llama(), LoRASPConfig(rank=RANK, init="random"))


def test_planner_counts_the_held_offset():
    arch = model_info("smollm2-135m").architecture
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    zeros = memory.Candidate(16, "float32", 16, targets, arch.num_layers, False, 4, 256, 1024)
    held = memory.Candidate(16, "float32", 16, targets, arch.num_layers, False, 4, 256, 1024, init="offset")
    total_zeros, trainable_zeros = memory.lora_entries(arch, zeros)
    total_held, trainable_held = memory.lora_entries(arch, held)
    # SmolLM2-135M, rank 16 on all 7 linears of 30 layers: 4,884,480 entries (docs/results.md), half trained.
    assert (total_zeros, trainable_zeros) == (4_884_480, 2_442_240)
    assert (total_held, trainable_held) == (2 * 4_884_480, 2_442_240)
    assert memory.lora_state_bytes(arch, held)["optimizer_state"] == memory.lora_state_bytes(arch, zeros)["optimizer_state"]
    # The LoRA matmuls run at rank r where the offset folds into a float32 base, at 2r elsewhere.
    assert (zeros.matmul_rank, held.matmul_rank) == (16, 16)
    bf16 = memory.Candidate(16, "bfloat16", 16, targets, arch.num_layers, False, 4, 256, 1024, init="offset")
    nf4 = memory.Candidate(4, "float32", 16, targets, arch.num_layers, False, 4, 256, 1024, init="offset")
    assert (bf16.matmul_rank, nf4.matmul_rank) == (32, 32)


# ------------------------------------------------------------------------- through the CLI


def test_offset_plan_trains_through_the_cli_and_resumes_bit_identical(capsys, tmp_path, model_dir, data_file):
    """A run stopped by a bad line and resumed equals one run straight through (both skip the line)."""
    from test_reliability import train as cli_train
    from test_trainer import write_plan

    plan = write_plan(tmp_path / "plan.json", model_dir, init="offset")
    data = tmp_path / "bad.jsonl"
    lines = data_file.read_text().splitlines()[:200]
    lines[50] = "{not json"
    data.write_text("\n".join(lines) + "\n")
    flags = ("--steps", "12", "--shuffle-buffer", "0", "--lr", "5e-3")
    code, _, err = cli_train(capsys, model_dir, data, tmp_path / "straight", plan, *flags, "--skip-bad-lines")
    assert code == 0, err
    code, _, err = cli_train(capsys, model_dir, data, tmp_path / "stopped", plan, *flags)
    assert code == 2 and "a checkpoint of step" in err
    code, _, err = cli_train(capsys, model_dir, data, tmp_path / "stopped", plan, *flags, "--resume", "--skip-bad-lines")
    assert code == 0, err
    for name in ("adapter_model.safetensors", "lorasp_masks.safetensors"):
        assert (tmp_path / "stopped" / "adapter" / name).read_bytes() == (tmp_path / "straight" / "adapter" / name).read_bytes(), name
    info = read_adapter_info(tmp_path / "straight" / "adapter")
    assert (info["init"], info["rank"], info["peft_config"]["r"]) == ("offset", 8, 16)

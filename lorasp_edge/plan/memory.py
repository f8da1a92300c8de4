"""Peak training memory of one LoRA-SP setting, by component, in bytes (per data-parallel rank).

    peak = runtime + frozen weights + LoRA-SP state + dequantization buffer
         + saved activations + max(chunked loss, one layer's backward)

Each term follows what the trainer runs (lorasp_edge.train: loop, loss, optim, adapter) and the
libraries under it; the formulas below name their source. The constants measured on this
project's machines come from tools/validate_planner.py (runtime, the fitted heap-slack constants) and
tools/heap_trace.py (heap holes); docs/planner.md holds the measurements.
Notation: T = micro_batch x seq_len tokens, h hidden size, q = heads x head_dim, kv = kv_heads x
head_dim, i intermediate size, V vocabulary, r rank, c bytes of the compute dtype (2 for bf16/fp16,
4 for fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

from lorasp_edge.plan.catalog import Architecture, Linear

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
LORA_BYTES = 4  # PEFT keeps adapter weights in fp32 (LoraConfig autocast_adapter_dtype=True)

# Bytes the process holds before any model exists.
#   cpu:  resident set of a fresh trainer process after importing torch, transformers, peft,
#         bitsandbytes and lorasp_edge (median over the validation runs, docs/planner.md).
#   cuda: the CUDA context, which torch.cuda.max_memory_allocated does not see: 287,047,680 B with
#         lazy module loading (PyTorch PR #86509, default since PyTorch 1.13 and CUDA 12.2);
#         cited, not measured here (no GPU on this project's machines).
#   mps:  unified memory: the host process itself, as for cpu (not measured here).
RUNTIME_BYTES = {"cpu": 411_000_000, "cuda": 300 * 2**20, "mps": 411_000_000}

# glibc malloc on CPU. Past its dynamic mmap threshold (it rises to the largest freed block, up to
# 32 MiB) tensors come from the heap, and a heap keeps what it once held. PyTorch asks for every
# CPU tensor 64-byte aligned (c10 alloc_cpu: posix_memalign), and glibc 2.36's memalign asks its
# bins for size + alignment + MINSIZE, so a freed block never holds the next tensor of its own
# size. In a forward with grad the temporaries a layer frees sit between tensors saved for
# backward, cannot merge, and stay as holes; the heap grows past the live tensors by a share of
# the saved activations (tools/heap_trace.py: `aligned` shows the reuse failing, `step` traces
# mallinfo2 per operator; SmolLM2-135M, fp32, 2 x 512: 26-35 MB of holes per layer beside 42.9 MB
# saved). With accumulation the first backward places the LoRA gradients inside the holes and
# splits them, and the next micro-batch's forward grows the heap again. Under checkpointing every
# adapted layer's forward runs again in backward, and each recomputed layer's tensors, freed before
# the next one's, leave holes the next cannot use: the heap grows with the number of layers
# recomputed. A 4/8-bit base dequantizes every weight to the compute dtype for each matmul, forward
# and backward, and frees it between saved tensors: a hole of the weight's size, which activations
# larger than it cannot use (SmolLM2-135M, fp32, tools/validate_planner.py: a 4-bit base peaked
# 0.51 GB above the 16-bit one at 4 x 512 x 2, and 0.29 GB below it at 1 x 256 x 4). Eager attention
# (Gemma 2) makes several batch x heads x seq x seq temporaries a layer (scores, scaled,
# soft-capped, masked) that sdpa never materialises. Every thread's arena keeps its
# own high-water mark: a fixed part.
# The slack is a sum of these terms (`heap_slack_terms`), each times its constant below; the
# constants are fitted by `python tools/validate_planner.py --fit RUNS.json` on two thirds of the
# validation grid and scored on the other third (docs/planner.md, "Validation").
HEAP_SLACK = {
    "saved": 0.83,  # of the activations saved with grad (the recomputed layer's too, under checkpointing)
    "accumulating": 0.70,  # of the same, more, when micro-batches accumulate
    "recompute": 0.57,  # of every adapted layer's working set (activations and backward), under checkpointing
    "dequantized": 0.21,  # of every adapted layer's linear weights in the compute dtype, a 4/8-bit base, per micro-batch
    # (where the micro-batch's hidden states are larger than the largest weight)
    "scores": 2.0,  # of every adapted layer's batch x heads x seq x seq scores, eager attention, per micro-batch
    "fixed": 100_000_000,  # bytes: the arenas' and first step's own (oneDNN kernels, thread pools, autograd)
}
# Under one mapping per large allocation only the small allocations use the heap.
HEAP_SLACK_BYTES = 10_000_000

# The heap constants above were fitted on models of up to 135M parameters (docs/planner.md). At
# Qwen2.5-1.5B's shape the heap's holes came to 2.4x the saved activations, where they predict about
# 1.2x, and the run peaked 28% over its plan; with every allocation of 1 MiB or more mapped on its own
# (lorasp_edge.allocator) the same command peaked at its plan (6.18 GB against 6.19), at the price of
# 1.31x the step time (an 8-layer A/B): tools/big_model_run.py, docs/planner.md "Past the fitted
# range". CPU plans for models past this size therefore map, and count no holes.
MMAP_FROM_PARAMETERS = 200_000_000


def host_allocator_for(arch: Architecture, device_kind: str) -> str:
    """The host allocator a plan runs with: mapped allocations for models past the fitted range, on CPU."""
    if device_kind == "cpu" and arch.parameters()["total"] > MMAP_FROM_PARAMETERS:
        return "mmap"
    return "heap"


@dataclass(frozen=True)
class Candidate:
    """One point of the planner's search space (what the plan file calls the same names)."""

    quant_bits: int  # 16 (float in compute dtype), 8 (LLM.int8) or 4 (NF4 + double quantization)
    compute_dtype: str
    rank: int
    target_modules: tuple[str, ...]
    adapted_layers: int  # the last n decoder layers get adapters
    gradient_checkpointing: bool
    micro_batch: int
    seq_len: int
    loss_chunk_tokens: int
    ratio: float = 0.5
    world_size: int = 1
    grad_accum: int = 1  # micro-batches per optimizer step
    packed: bool = True  # position ids restart at each packed example: attention masked block-diagonally
    host_allocator: str = "heap"  # lorasp_edge.allocator: glibc's heap, or a mapping per allocation of 1 MiB or more
    init: str = "zeros"  # LoRA-SP's start, one of INITS

    @property
    def held_rank(self) -> int:
        return held_rank(self.rank, self.init)

    @property
    def matmul_rank(self) -> int:
        return self.rank if folds_offset(self.init, self.quant_bits, self.compute_dtype) else self.held_rank


# LoRA-SP's starts (train.adapter.LoRASPConfig.init): zeros, LoRA's B = 0; offset, B random, held as [B, -B0] [A; A0].
INITS = ("zeros", "offset")


def folds_offset(init: str, quant_bits: int, compute_dtype: str) -> bool:
    """The offset folded into a float32 base (train.adapter.float32_base): the LoRA matmuls at rank r."""
    return init == "offset" and quant_bits == 16 and compute_dtype == "float32"


def held_rank(rank: int, init: str) -> int:
    """The rank of the matrices an adapter of this rank and start holds (and PEFT's `r`)."""
    return 2 * rank if init == "offset" else rank


# ----------------------------------------------------------------------------- frozen weights


def quantized_weight_bytes(linear: Linear, bits: int, compute_bytes: int) -> int:
    """Storage of one frozen linear weight (bias not included).

    16: the weight in the compute dtype.
    8:  LLM.int8 (Dettmers et al. 2022, arXiv 2208.07339, Sec. 3.1 vector-wise quantization):
        int8 weight + one fp32 scale per output row (bitsandbytes Int8Params SCB).
    4:  NF4 with double quantization (Dettmers et al. 2023, QLoRA, arXiv 2305.14314, Sec. 3):
        4-bit codes, blocksize 64; the 64-block absmax constants are themselves quantized to 8 bit
        in blocks of 256 with one fp32 absmax each: 4 + 8/64 + 32/(64*256) bits per parameter,
        plus the 256-entry fp32 code and an fp32 offset per tensor (bitsandbytes QuantState).
    """
    n = linear.weight_params
    if bits == 16:
        return n * compute_bytes
    if bits == 8:
        return n + 4 * linear.d_out
    if bits == 4:
        blocks = -(-n // 64)
        return -(-n // 2) + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4
    raise ValueError(f"quant bits must be 4, 8 or 16, not {bits}")


def weight_bytes(arch: Architecture, bits: int, compute_bytes: int) -> dict[str, int]:
    """Decoder linears in their storage format; embeddings, lm_head, norms and biases stay in the
    compute dtype (transformers quantizes only the decoder's nn.Linear layers and skips lm_head)."""
    params = arch.parameters()
    quantized = arch.num_layers * sum(quantized_weight_bytes(linear, bits, compute_bytes) for linear in arch.linears())
    floating = (params["total"] - params["linear"]) * compute_bytes
    return {"weights_linear": quantized, "weights_float": floating}


def checkpoint_page_bytes(arch: Architecture, bits: int, compute_dtype: str, prequantized: bool = True) -> int:
    """Pages of the 16-bit checkpoint that stay resident while a 4/8-bit model trains on CPU.

    Pre-quantized (how lorasp_edge.models loads a 4/8-bit base on CPU: quantized once into the
    cache by lorasp_edge.prequantize, or a `lorasp-edge quantize` folder): nothing 16-bit is read,
    so nothing is mapped: 0.
    Quantized on the fly (transformers' load_in_4bit/8bit from the 16-bit file, `prequantized`
    False) they still count: transformers reads safetensors through mmap; a float tensor whose
    dtype already matches the compute dtype (embeddings, norms) is used in place, which keeps the
    file mapped, and the linear weights read for quantization stay resident with it (measured with
    /proc/self/smaps_rollup: Pss_File). They are clean pages, but the kernel drops them only under
    pressure, and the in-place tensors are read every step, so dropping them turns into re-reads
    from disk each step: the budget keeps them. With a dtype conversion nothing maps the file."""
    if prequantized or bits == 16 or arch.checkpoint_dtype != compute_dtype:
        return 0
    return arch.parameters()["linear"] * DTYPE_BYTES.get(arch.checkpoint_dtype, 4)


def dequant_buffer_bytes(arch: Architecture, bits: int, compute_bytes: int) -> int:
    """A 4/8-bit weight is dequantized to the compute dtype for each matmul and freed after it
    (bitsandbytes 0.50: gemm_4bit / MatMul4Bit.backward call dequantize_4bit; MatMul8bitFp and
    MatMul8bitLt.backward build CB * SCB / 127), so one largest linear lives at a time; for 4-bit
    the fp32 absmax vector is dequantized beside it (one fp32 value per block of 64)."""
    if bits == 16:
        return 0
    largest = max(linear.weight_params for linear in arch.linears())
    absmax = 4 * -(-largest // 64) if bits == 4 else 0
    return largest * compute_bytes + absmax


# ----------------------------------------------------------------------------- LoRA-SP state


def adapted_linears(arch: Architecture, target_modules: tuple[str, ...]) -> list[Linear]:
    return [linear for linear in arch.linears() if linear.name in target_modules]


def lora_entries(arch: Architecture, setting: Candidate) -> tuple[int, int]:
    """(all LoRA entries, trainable entries): A is r x d_in, B is d_out x r (Hu et al. 2021,
    arXiv 2106.09685, Sec. 4.1); LoRA-SP freezes round(ratio * numel) of each matrix
    (Wu et al. 2024, arXiv 2403.08822; lorasp_edge.train.masks.frozen_count). The offset init
    holds twice the rank, the offset half frozen whole: as many trainable entries, twice the total."""
    total = trainable = 0
    for linear in adapted_linears(arch, setting.target_modules):
        for numel in (setting.rank * linear.d_in, linear.d_out * setting.rank):
            total += numel // setting.rank * setting.held_rank
            trainable += numel - int(round(setting.ratio * numel))
    return total * setting.adapted_layers, trainable * setting.adapted_layers


def lora_state_bytes(arch: Architecture, setting: Candidate) -> dict[str, int]:
    """LoRA-SP as the trainer holds it (lorasp_edge.train.flat: all N entries of a model's LoRA
    matrices in one fp32 `full` buffer, the T trainable ones as one `values` parameter at int64
    positions `index`, the matrices rebuilt by a scatter each forward and cached until the next):
    weights = full + rebuilt + values; gradients = the rebuilt matrices' (autograd gathers the
    per-matrix gradients before the scatter's backward picks `values`' out of them) + values';
    AdamW m and v in fp32 for `values` only (Loshchilov & Hutter 2019, Alg. 2).
    Under mixed precision autocast keeps a compute-dtype copy of every LoRA weight for the step."""
    total, trainable = lora_entries(arch, setting)
    compute_bytes = DTYPE_BYTES[setting.compute_dtype]
    casts = total * compute_bytes if compute_bytes != LORA_BYTES else 0
    state = {
        "lora_weights": 2 * total * LORA_BYTES + trainable * LORA_BYTES + casts,
        "lora_grads": total * LORA_BYTES + trainable * LORA_BYTES,
        "lora_index": 8 * trainable,
        "optimizer_state": 2 * 4 * trainable,
    }
    if setting.world_size > 1:
        # DistributedDataParallel copies the gradients it reduces (`values`') into flat buckets.
        state["ddp_buckets"] = trainable * LORA_BYTES
    return state


# ----------------------------------------------------------------------------- activations


def _linear_groups(arch: Architecture) -> list[tuple[int, list[str]]]:
    """(input width, linears reading that same input tensor) in forward order (the family's groups)."""
    fam = arch.family
    sizes = (arch.hidden_size, arch.intermediate_size, arch.q_size, arch.kv_size)
    return [(fam.width(width, *sizes), list(names)) for width, names in fam.input_groups]


def linear_input_bytes(arch: Architecture, setting: Candidate, tokens: int) -> int:
    """Inputs kept for the linears' backward, per layer. A frozen float linear keeps no input.
    LoRA's A needs its input: on a float or 4-bit base the tensor the base layer read (shared by q,
    k and v; train.lora_linear never casts it); on an 8-bit base PEFT's layer casts x to the fp32
    adapter dtype under bf16 autocast and autocast casts it back, a compute-dtype copy per module.
    bitsandbytes' 8-bit matmul keeps its input on ctx (`ctx.A = A`), outside autograd's saved
    tensors, so checkpointing does not free it. LoRA's B keeps A's output: T x r."""
    c = DTYPE_BYTES[setting.compute_dtype]
    mixed = c != LORA_BYTES and setting.quant_bits == 8  # PEFT's layer: a cast copy per module
    kept = 0
    for group, (width, names) in enumerate(_linear_groups(arch)):
        adapted = [name for name in names if name in setting.target_modules]
        # The attention output feeding o_proj is the tensor attention already keeps (sdpa's
        # output is laid out so that the transpose back is free; eager's is its own copy).
        shared_kept = group != 1 and (setting.quant_bits == 8 or (adapted and not mixed))
        kept += tokens * width * c if shared_kept else 0
        if mixed:
            kept += len(adapted) * tokens * width * c
        kept += len(adapted) * tokens * setting.matmul_rank * c
    return kept


def attention_bytes(arch: Architecture, setting: Candidate) -> int:
    """Saved by attention, per layer.

    sdpa (transformers' default; CPU flash kernel): the rotated q and k, v, the output and an fp32
    logsumexp per head and token. One sequence a block: is_causal and no mask, GQA via enable_gqa.
    Packed blocks (restarting position ids): transformers passes a block-diagonal boolean mask
    and repeats the kv heads to H (repeat_kv), and sdpa turns the mask into a float one of the
    query's dtype on every call, which the kernel keeps for backward: b x s x s x c per layer
    (measured with the live-tensor check: `aten.where` (b, 1, s, s) and `clone` (b, kv, H/kv, s, d)).
    eager (Gemma 2, whose logit soft-capping sdpa cannot do): scores, their tanh cap, the fp32
    softmax and its compute-dtype copy, b x H x s x s each, plus q and the kv heads repeated to H.
    """
    c = DTYPE_BYTES[setting.compute_dtype]
    b, s = setting.micro_batch, setting.seq_len
    tokens = b * s
    q, kv, heads = arch.q_size, arch.kv_size, arch.num_heads
    if arch.family.attention == "eager":
        square = b * heads * s * s
        return tokens * (q + 2 * q) * c + square * (2 * c + 4) + tokens * q * c
    packed = 2 * tokens * (q - kv) * c + b * s * s * c if setting.packed else 0
    if arch.family.fused_qkv:
        # v is a view of the fused qkv output, which therefore stays alive whole.
        return tokens * (q + kv) * c + tokens * (q + 2 * kv) * c + tokens * q * c + 4 * b * heads * s + packed
    return tokens * (q + kv + kv + q) * c + 4 * b * heads * s + packed


def layer_activation_bytes(arch: Architecture, setting: Candidate) -> int:
    """Bytes autograd keeps for one adapted decoder layer without checkpointing.

    RMSNorm (transformers LlamaRMSNorm: x.to(fp32), pow, mean, rsqrt, mul) keeps the fp32 input
    and the fp32 reciprocal RMS per token; gated MLP keeps gate, act(gate) and up
    (T x i each; SwiGLU, Shazeer 2020, arXiv 2002.05202); plus attention and linear inputs.
    """
    c = DTYPE_BYTES[setting.compute_dtype]
    tokens = setting.micro_batch * setting.seq_len
    h, i = arch.hidden_size, arch.intermediate_size
    norms = arch.norms_per_layer * (4 * tokens * h + 4 * tokens)
    mlp = 3 * tokens * i * c
    return norms + attention_bytes(arch, setting) + mlp + linear_input_bytes(arch, setting, tokens)


def layer_backward_bytes(arch: Architecture, setting: Candidate) -> int:
    """Gradients in flight inside one layer's backward: the MLP's (d act*up, d gate, d up, T x i
    each) beside the incoming gradient of the residual stream (T x h)."""
    c = DTYPE_BYTES[setting.compute_dtype]
    tokens = setting.micro_batch * setting.seq_len
    return 3 * tokens * arch.intermediate_size * c + 2 * tokens * arch.hidden_size * c


def activation_bytes(arch: Architecture, setting: Candidate) -> dict[str, int]:
    """Saved activations over the whole step, and the transient on top of them.

    Layers before the first adapted one hold nothing: no tensor there requires grad. With
    transformers' non-reentrant checkpointing (Chen et al. 2016, arXiv 1604.06174) each adapted
    layer keeps only its input, and one layer is recomputed at a time during backward.
    After the decoder: the final norm and the flattened hidden states the chunked loss reads.
    """
    c = DTYPE_BYTES[setting.compute_dtype]
    tokens = setting.micro_batch * setting.seq_len
    h = arch.hidden_size
    n = setting.adapted_layers
    per_layer = layer_activation_bytes(arch, setting)
    final = 4 * tokens * h + 4 * tokens + tokens * h * c
    rope = 2 * tokens * arch.head_dim * c  # cos and sin, shared by all layers
    if setting.packed:
        rope += setting.micro_batch * setting.seq_len**2  # the boolean block mask, shared by all layers
    if setting.gradient_checkpointing:
        kept_8bit = n * _int8_inputs(arch, setting, tokens)
        saved = n * tokens * h * c + kept_8bit + final + rope
        recompute = per_layer
    else:
        saved = n * per_layer + final + rope
        recompute = 0
    return {"saved": saved, "recompute": recompute, "backward": layer_backward_bytes(arch, setting)}


def _int8_inputs(arch: Architecture, setting: Candidate, tokens: int) -> int:
    if setting.quant_bits != 8:
        return 0
    c = DTYPE_BYTES[setting.compute_dtype]
    return sum(tokens * width * c for width, _ in _linear_groups(arch))


def loss_bytes(arch: Architecture, setting: Candidate) -> int:
    """The chunked loss (lorasp_edge.train.loss), `chunk` tokens at a time: two fp32 chunk x V
    tensors when log-softmax writes beside the fp32 logits (.float() keeps no input; the backward
    works in place). Gemma 2's soft cap keeps tanh's output beside them: three."""
    chunk = min(setting.loss_chunk_tokens, setting.micro_batch * (setting.seq_len - 1))
    return chunk * arch.vocab_size * (12 if arch.family.logit_softcap else 8)


def saved_with_grad_bytes(activations: dict[str, int], setting: Candidate) -> int:
    """What forwards with grad save over a step: under checkpointing the layers' forward saves only
    their inputs, and the recomputed layer's forward runs with grad, one at a time."""
    return activations["saved"] + (activations["recompute"] if setting.gradient_checkpointing else 0)


def heap_slack_terms(arch: Architecture, setting: Candidate, saved_bytes: int) -> dict[str, int]:
    """The quantities the heap's slack scales with (CPU only), by the names of `HEAP_SLACK`.

    Holes the forward leaves (`saved_bytes`, the activations saved with grad; again when
    micro-batches accumulate), the holes of every recomputed layer under checkpointing, the
    dequantized copies of a 4/8-bit base's weights, eager attention's score temporaries, and a
    fixed part. Loading leaves no holes: on CPU a 4/8-bit base is loaded
    pre-quantized (lorasp_edge.models), and quantizing it into the cache hands the heap back after
    each tensor (allocator.trim_heap). Measured: loading a pre-quantized Qwen2.5-0.5B-shape folder
    (tools/big_model_run.py `make`, `lorasp-edge quantize --bits 4`) adds 0.78 GB of anonymous
    memory for 0.73 GB of tensors."""
    layer = layer_activation_bytes(arch, setting) + layer_backward_bytes(arch, setting)
    n = setting.adapted_layers
    eager = arch.family.attention == "eager"
    c = DTYPE_BYTES[setting.compute_dtype]
    scores = setting.micro_batch * arch.num_heads * setting.seq_len**2 * c
    # A dequantized weight's hole stays only where the micro-batch's hidden states (T x h) are larger
    # than the largest weight: smaller activations fill it.
    linears = arch.linears()
    quantized = setting.quant_bits != 16
    holes_stay = setting.micro_batch * setting.seq_len * arch.hidden_size > max(linear.weight_params for linear in linears)
    return {
        "saved": saved_bytes,
        "accumulating": saved_bytes * (setting.grad_accum > 1),
        "recompute": n * layer * setting.gradient_checkpointing,
        # temporaries of every micro-batch's forward and backward: each micro-batch leaves its own
        "dequantized": n * sum(linear.weight_params for linear in linears) * c * setting.grad_accum * (quantized and holes_stay),
        "scores": n * scores * eager * setting.grad_accum,
        "fixed": 1,
    }


def heap_slack_bytes(arch: Architecture, setting: Candidate, saved_bytes: int, constants: dict[str, float] = HEAP_SLACK) -> int:
    """Resident memory glibc's heap holds beyond the live tensors (CPU only)."""
    return int(sum(constants[name] * value for name, value in heap_slack_terms(arch, setting, saved_bytes).items()))


# ----------------------------------------------------------------------------- the total


def estimate(arch: Architecture, setting: Candidate, device_kind: str = "cpu", unified_memory: bool = False) -> dict[str, int]:
    """Peak bytes by component, with `total_bytes`."""
    compute_bytes = DTYPE_BYTES[setting.compute_dtype]
    runtime = RUNTIME_BYTES[device_kind]
    if device_kind == "cuda" and unified_memory:
        runtime += RUNTIME_BYTES["cpu"]  # Jetson: the host process shares the same memory
    parts = {"runtime": runtime}
    parts.update(weight_bytes(arch, setting.quant_bits, compute_bytes))
    if device_kind == "cpu":  # on a GPU every weight is copied to device memory: nothing stays mapped
        parts["checkpoint_pages"] = checkpoint_page_bytes(arch, setting.quant_bits, setting.compute_dtype)
    parts.update(lora_state_bytes(arch, setting))
    activations = activation_bytes(arch, setting)
    parts["activations"] = activations["saved"]
    # After the decoder's forward, the loss chunks run (their backward is the first thing backward
    # does); only then does backward walk the layers, recomputing one under checkpointing, with
    # the 4/8-bit weights dequantized one at a time. The larger of the two sits on top of `saved`.
    layer_walk = activations["recompute"] + activations["backward"] + dequant_buffer_bytes(arch, setting.quant_bits, compute_bytes)
    parts["transient"] = max(loss_bytes(arch, setting), layer_walk)
    if device_kind == "cpu":
        if setting.host_allocator == "mmap":
            parts["allocator_slack"] = HEAP_SLACK_BYTES  # allocations below the threshold still use the heap
        else:
            parts["allocator_slack"] = heap_slack_bytes(arch, setting, saved_with_grad_bytes(activations, setting))
    parts = {key: int(value) for key, value in parts.items() if value}
    step = sum(parts.values())
    # Loading can peak above the step: the part by which it does, so the total is the larger of the two.
    parts["loading"] = max(0, load_peak_bytes(arch, setting, device_kind, runtime, parts) - step)
    parts = {key: value for key, value in parts.items() if value}
    parts["total_bytes"] = sum(parts.values())
    return parts


def load_peak_bytes(arch: Architecture, setting: Candidate, device_kind: str, runtime: int, parts: dict[str, int]) -> int:
    """The resident peak of loading a 4/8-bit base on CPU, before training allocates anything.

    A pre-quantized folder (how lorasp_edge.models loads a 4/8-bit base on CPU) keeps its float
    tensors in the dtype they were stored in, and `load_model` casts them to the compute dtype after
    loading, one at a time: the largest (the vocabulary table) then exists in both dtypes at once.
    At Gemma 2's 256,000 x 2,304 table that is 1.18 GB of bf16 beside 2.36 GB of fp32; an 8-layer
    Gemma-2-2B shape planned at 3.60 GB for its step failed to allocate the fp32 copy under a 4 GB
    limit (tools/big_model_run.py, docs/planner.md "At size")."""
    if device_kind != "cpu" or setting.quant_bits not in (4, 8):
        return 0
    stored = DTYPE_BYTES.get(arch.checkpoint_dtype, 4)
    if stored == DTYPE_BYTES[setting.compute_dtype]:
        return 0
    table = arch.vocab_size * arch.hidden_size * stored
    return runtime + parts.get("weights_linear", 0) + parts.get("weights_float", 0) + table

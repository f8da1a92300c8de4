"""The optimizer step alone: LoRA-SP's MaskedAdamW (with its gradient hook) against torch AdamW.

    python tools/bench_optimizer.py [--model smollm2-135m] [--rank 16] [--repeats 30]

LoRA A (rank x d_in) and B (d_out x rank) tensors for every linear layer of every decoder layer
of a catalog model, fp32, random gradients; half of each tensor's entries trainable (ratio 0.5).
Times per optimizer step (median of --repeats after 3 warm-up steps), on this process's threads:
- MaskedAdamW: the gradient hook's mask multiply plus `MaskedAdamW.step` (state for the
  trainable half only);
- torch AdamW: `torch.optim.AdamW.step` over the whole tensors (PEFT LoRA's optimizer);
- of MaskedAdamW, its gather and scatter through the mask: `masked_select` of the gradient and of
  the weight, `masked_scatter_` of the result;
- the same gather and scatter through cached int32 flat indices (`index_select`, `index_copy_`
  after widening to int64, which it requires), which would cost 4 bytes per trainable entry to keep.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def median_ms(run, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="catalog id (default: smollm2-135m)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    import torch

    from lorasp_edge.plan.catalog import resolve
    from lorasp_edge.train.optim import MaskedAdamW

    arch = resolve(args.model).architecture
    shapes = [shape for _ in range(arch.num_layers) for linear in arch.linears() for shape in ((args.rank, linear.d_in), (linear.d_out, args.rank))]
    generator = torch.Generator().manual_seed(0)

    def tensors():
        params = [torch.nn.Parameter(0.01 * torch.randn(shape, generator=generator)) for shape in shapes]
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        return params

    masked_params = tensors()
    masks = {param: torch.rand(param.shape, generator=generator) < 0.5 for param in masked_params}
    raw_grads = [param.grad.clone() for param in masked_params]
    masked = MaskedAdamW(masks, lr=1e-3)

    def masked_step():
        for param, grad in zip(masked_params, raw_grads):
            param.grad = grad * masks[param]  # what the adapter's gradient hook returns
        masked.step()

    plain_params = tensors()
    plain = torch.optim.AdamW(plain_params, lr=1e-3, weight_decay=0.0)

    mask_list = [masks[param] for param in masked_params]
    weights = [param.detach() for param in masked_params]

    def through_mask():
        for grad, weight, mask in zip(raw_grads, weights, mask_list):
            grad.masked_select(mask)
            weight.masked_scatter_(mask, weight.masked_select(mask))

    indices = [mask.view(-1).nonzero().squeeze(1).to(torch.int32) for mask in mask_list]

    def through_indices():
        for grad, weight, index in zip(raw_grads, weights, indices):
            grad.view(-1).index_select(0, index)
            # index_copy_ takes int64 indices only: the int32 cache is widened for each write
            weight.view(-1).index_copy_(0, index.long(), weight.view(-1).index_select(0, index))

    entries = sum(a * b for a, b in shapes)
    print(f"{args.model}: {len(shapes)} LoRA tensors at rank {args.rank}, {entries:,} entries, {torch.get_num_threads()} threads")
    rows = [
        ("MaskedAdamW step + gradient hook", median_ms(masked_step, args.repeats)),
        ("torch AdamW step", median_ms(plain.step, args.repeats)),
        ("  of MaskedAdamW: masked_select x2 + masked_scatter_", median_ms(through_mask, args.repeats)),
        ("  cached int32 indices: index_select x2 + index_copy_", median_ms(through_indices, args.repeats)),
    ]
    for label, ms in rows:
        print(f"{label:55s} {ms:8.1f} ms")
    trainable = sum(index.numel() for index in indices)
    print(f"int32 index cache: {4 * trainable / 1e6:.1f} MB, against {8 * trainable / 1e6:.1f} MB of m and v")


if __name__ == "__main__":
    main()

"""The optimizer step alone: LoRA-SP's flat AdamW against torch AdamW over PEFT LoRA's tensors.

    python tools/bench_optimizer.py [--model smollm2-135m] [--rank 16] [--repeats 30]

LoRA A (rank x d_in) and B (d_out x rank) tensors for every linear layer of every decoder layer
of a catalog model, fp32, random gradients. Times per step (median of --repeats after 3 warm-up
steps), on this process's threads:
- LoRA-SP: `LoRASPAdamW.step` (torch AdamW, fused where supported) over the one flat parameter of
  trainable entries (ratio 0.5: half of the LoRA entries);
- torch AdamW, PEFT LoRA: `torch.optim.AdamW(params)` with torch's default implementation for the
  device, over every whole LoRA tensor (what a plain PEFT loop runs), and the same with fused=True;
- the work LoRA-SP adds outside the optimizer, once per forward and backward: the rebuild of every
  matrix from the frozen buffer and the trainable values (one scatter), and the gather of the
  trainable entries' gradient (one index_select), from lorasp_edge.train.flat.
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

    from lorasp_edge.plan.catalog import model_info
    from lorasp_edge.train.flat import LoRASPStore, _Rebuild
    from lorasp_edge.train.masks import draw_frozen_mask
    from lorasp_edge.train.optim import LoRASPAdamW

    arch = model_info(args.model).architecture
    shapes = [shape for _ in range(arch.num_layers) for linear in arch.linears() for shape in ((args.rank, linear.d_in), (linear.d_out, args.rank))]
    generator = torch.Generator().manual_seed(0)

    def tensors():
        params = [torch.nn.Parameter(0.01 * torch.randn(shape, generator=generator)) for shape in shapes]
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator)
        return params

    weights = tensors()
    masks = [~draw_frozen_mask(shape, 0.5, 0, f"m{i}", "A") for i, shape in enumerate(shapes)]
    store = LoRASPStore([w.detach() for w in weights], masks)
    store.values.grad = torch.randn(store.values.shape, generator=generator)
    flat = LoRASPAdamW([store.values], lr=1e-3)

    plain = torch.optim.AdamW(tensors(), lr=1e-3, weight_decay=0.0)
    plain_fused = torch.optim.AdamW(tensors(), lr=1e-3, weight_decay=0.0, fused=True)

    def rebuild():
        with torch.no_grad():
            store.full.scatter(0, store.index, store.values)

    full_grad = torch.randn(store.full.shape, generator=generator)

    def gather():
        full_grad.index_select(0, store.index)

    def rebuild_and_gather():
        values = store.values.detach().requires_grad_()
        _Rebuild.apply(store.full, values, store.index).backward(full_grad)

    entries = sum(a * b for a, b in shapes)
    print(f"{args.model}: {len(shapes)} LoRA tensors at rank {args.rank}, {entries:,} entries "
          f"({store.values.numel():,} trainable in LoRA-SP), {torch.get_num_threads()} threads")
    rows = [
        ("LoRA-SP: LoRASPAdamW step (fused, one flat tensor)", median_ms(flat.step, args.repeats)),
        ("PEFT LoRA: torch AdamW step (default)", median_ms(plain.step, args.repeats)),
        ("PEFT LoRA: torch AdamW step (fused=True)", median_ms(plain_fused.step, args.repeats)),
        ("LoRA-SP extra, forward: rebuild (one scatter)", median_ms(rebuild, args.repeats)),
        ("LoRA-SP extra, backward: gradient gather (one index_select)", median_ms(gather, args.repeats)),
        ("LoRA-SP extra, both through autograd", median_ms(rebuild_and_gather, args.repeats)),
    ]
    for label, ms in rows:
        print(f"{label:62s} {ms:8.1f} ms")


if __name__ == "__main__":
    main()

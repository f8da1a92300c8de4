"""Where a CPU training step's resident memory goes beyond its live tensors: glibc's heap.

    python tools/heap_trace.py aligned
    python tools/heap_trace.py step [--model smollm2-135m] [--dtype float32] [--batch 2] [--seq 512]
                                    [--rank 64] [--chunk 512] [--accum 2] [--ckpt] [--bits 16]

`aligned`: does glibc give a freed block back to the next request of the same size? PyTorch asks
for every CPU tensor 64-byte aligned (c10 alloc_cpu: posix_memalign); 100 rounds of keep, temporary,
keep, free the temporary, with 2.36 MB blocks (a 2 x 512 x 576 fp32 tensor), with malloc and with
posix_memalign, report the heap and its free holes (mallinfo2).

`step`: one optimizer step of the trainer's `train_step` (micro-batches packed as
tools/validate_planner.py packs them), with glibc's mallinfo2 and the resident set read after
every aten operator (a TorchDispatchMode). Prints, per decoder layer of the first forward, the
heap's growth against the live bytes' growth (the difference: holes left behind), and at the
resident peak of each micro-batch the heap, its live and free bytes and the mmapped bytes, beside
the planner's terms for the same setting. The trace slows the step several-fold.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _libc():
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    libc.posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
    return libc


def aligned(block: int = 2_359_296, rounds: int = 100) -> None:
    import subprocess

    for how in ("malloc", "posix_memalign"):
        # A fresh process each, so that the two heaps start alike.
        done = subprocess.run([sys.executable, __file__, "_aligned_child", how, str(block), str(rounds)], capture_output=True, text=True, check=True)
        print(done.stdout.strip())


def _aligned_child(how: str, block: int, rounds: int) -> None:
    libc = _libc()
    libc.mallopt(-3, 64 * 2**20)  # M_MMAP_THRESHOLD above the block: heap blocks, as after PyTorch's first frees

    def allocate():
        if how == "malloc":
            return libc.malloc(block)
        pointer = ctypes.c_void_p()
        libc.posix_memalign(ctypes.byref(pointer), 64, block)
        return pointer.value

    kept = []
    for _ in range(rounds):
        kept.append(allocate())
        temporary = allocate()
        kept.append(allocate())
        libc.free(temporary)
    info = libc.mallinfo2()
    print(f"{how:15s} live {info.uordblks / 1e6:7.1f} MB  heap {info.arena / 1e6:7.1f} MB  free holes {info.fordblks / 1e6:7.1f} MB")


def step(args) -> None:
    import psutil
    from torch.utils._python_dispatch import TorchDispatchMode
    from validate_planner import batches, model_name, point, setting_of

    from lorasp_edge.plan.catalog import model_info
    from lorasp_edge.plan.memory import estimate
    from lorasp_edge.plan.search import Device, plan_for_setting
    from lorasp_edge.train.loop import build_model, build_optimizer
    from lorasp_edge.train.step import train_step

    spec = point(args.model, args.bits, args.dtype, args.ckpt, args.seq, args.batch, rank=args.rank, chunk=args.chunk, accum=args.accum)
    name = model_name(spec)
    arch = model_info(name).architecture
    setting = setting_of(spec, arch)
    plan = plan_for_setting(name, setting, Device("cpu", True, (16, 8, 4)), grad_accum=args.accum)
    libc = _libc()
    process = psutil.Process()
    baseline = process.memory_info().rss
    model = build_model(plan, name, device="cpu")
    model.train()
    optimizer = build_optimizer(model)
    rows = []

    class Trace(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            info = libc.mallinfo2()
            rows.append((str(func), info.arena, info.uordblks, info.hblkhd, process.memory_info().rss - baseline))
            return out

    started = time.perf_counter()
    with Trace():
        train_step(model, optimizer, batches(spec, arch.vocab_size), plan)
    print(f"{spec['batch']}x{spec['seq']} x{args.accum} {setting.compute_dtype} {args.bits}b: {len(rows)} operators, {time.perf_counter() - started:.0f} s")

    starts = [i for i, row in enumerate(rows) if row[0].startswith("aten.embedding.")]
    first_forward_end = next((i for i, row in enumerate(rows) if row[0].startswith("aten._log_softmax.")), len(rows))
    norms = [i for i in range(starts[0], first_forward_end) if rows[i][0].startswith("aten.pow.")]
    per_layer = arch.norms_per_layer
    layer_starts = norms[::per_layer]
    holes = []
    for a, b in zip(layer_starts, layer_starts[1:]):
        heap, live = rows[b][1] - rows[a][1], rows[b][2] - rows[a][2]
        holes.append((heap - live, live))
    if holes:
        shares = sorted(h / live for h, live in holes[1:] if live > 0)
        print(f"first forward, per layer (layers 2-{len(holes)}): holes {min(h for h, _ in holes[1:]) / 1e6:.1f}-{max(h for h, _ in holes[1:]) / 1e6:.1f} MB "
              f"beside {holes[1][1] / 1e6:.1f} MB live; holes / live {shares[0]:.2f}-{shares[-1]:.2f}, median {shares[len(shares) // 2]:.2f}")
    bounds = starts + [len(rows)]
    parts = estimate(arch, setting, "cpu")
    for index, (a, b) in enumerate(zip(bounds, bounds[1:])):
        peak = max(range(a, b), key=lambda i: rows[i][4])
        _, heap, live, mapped, rss = rows[peak]
        print(f"micro-batch {index + 1} resident peak at {rows[peak][0]}: resident +{rss / 1e6:.0f} MB, heap {heap / 1e6:.0f} MB "
              f"(live {live / 1e6:.0f}, free {(heap - live) / 1e6:.0f}), mmapped {mapped / 1e6:.0f} MB")
    print("planner: " + ", ".join(f"{key} {value / 1e6:.0f}" for key, value in parts.items()) + " (MB)")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_aligned_child":
        _aligned_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["aligned", "step"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--bits", type=int, default=16)
    parser.add_argument("--ckpt", action="store_true")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--accum", type=int, default=2)
    args = parser.parse_args()
    if args.what == "aligned":
        aligned()
    else:
        step(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

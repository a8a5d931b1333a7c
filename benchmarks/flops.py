#!/usr/bin/env python
"""Achieved FLOP/s of the block meta-gradient against this machine's measured matmul peak.

FLOPs are COUNTED, not estimated: torch.utils.flop_counter.FlopCounterMode records one call
(it sees the batched aten.bmm kernels under vmap and the mm/addmm kernels of the loop). It counts
matrix products and convolutions only (2 FLOPs per multiply-add); elementwise work (activations,
the cross-entropy, the axpy updates) is not counted, so the figures are a slight undercount. For
the first-order method the count is checked against the analytic value (ν+1 gradients per agent,
each 2·b·Σ in·out forward + 2·b·Σ in·out for the weight gradients + 2·b·Σ_{l≥2} in·out for the
input gradients) and the script fails loudly if they disagree.

Achieved FLOP/s = counted FLOPs / median seconds of one call (warm-up, then interleaved
repeats). The reference is the median FLOP/s of a large float32 matmul (2048×2048 by default)
on the same device with the same threads: a practical upper limit, not a datasheet number.

    python benchmarks/flops.py                    # mlp, ν ∈ {1,3}, exact/fo, blocks 32 and 128
    python benchmarks/flops.py --quick
    python benchmarks/flops.py --models mlp cnn --nus 1 3 5 --blocks 8 32 --peak-n 4096
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import common  # noqa: E402
from baseline import LoopBaseline  # noqa: E402
from mpifedmeta.core import metagrad  # noqa: E402

ALPHA, DELTA = 0.01, 1e-3


def matmul_peak(device, n: int, repeats: int, dtype=torch.float32) -> dict:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = common.interleaved({"mm": lambda: torch.mm(a, b)}, device, repeats, float("inf"))["mm"]
    flops = 2.0 * n ** 3
    return {"n": n, "dtype": str(dtype), "flops": flops, "median_s": t["median_s"], "min_s": t["min_s"],
            "gflops_median": flops / t["median_s"] / 1e9, "gflops_best": flops / t["min_s"] / 1e9,
            "repeats": t["repeats"], "tf32": bool(device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)}


def count_flops(fn) -> tuple[int, dict]:
    with FlopCounterMode(display=False) as fc:
        fn()
    per_op = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    return int(fc.get_total_flops()), per_op


def analytic_fo_mlp(p: common.Problem) -> int | None:
    """FLOPs of (ν+1) gradients per agent for the MLP (matmuls only)."""
    lin = [m for m in p.model.modules() if isinstance(m, torch.nn.Linear)]
    if p.model_name != "mlp" or not lin:
        return None
    s_all = sum(m.in_features * m.out_features for m in lin)
    s_rest = sum(m.in_features * m.out_features for m in lin[1:])
    per_grad = 4 * p.batch * s_all + 2 * p.batch * s_rest
    return (p.nu + 1) * p.B * per_grad


def measure_config(model, nu, method, B, args, device, peak: dict) -> list[dict]:
    """Counted FLOPs and interleaved timings of every variant on one block; one row per variant."""
    p = common.Problem(model, B, nu, method, batch=args.batch, device=device)
    base = LoopBaseline(p.model)
    fns = {v: (lambda: base.block_meta_gradients(p.params, p.X, p.Y, p.idx, p.nu, ALPHA, p.method, DELTA))
           if v == "baseline" else common.engine_block(p, v, args.chunk, ALPHA, DELTA) for v in args.variants}
    counts = {v: count_flops(fn) for v, fn in fns.items()}
    analytic = analytic_fo_mlp(p) if method == "fo" else None
    for v, (c, _) in counts.items():
        if analytic is not None and c != analytic:
            raise SystemExit(f"flop counter disagrees with the analytic count for fo ({v}: {c} vs {analytic})")
    t = common.interleaved(fns, device, args.repeats, args.budget)
    rows = []
    for v in fns:
        flops, per_op = counts[v]
        g = flops / t[v]["median_s"] / 1e9
        rows.append({"model": model, "nu": nu, "method": method, "B": B, "variant": v, "flops": flops,
                     "flops_per_agent": flops / B, "flops_by_op": per_op, "analytic_fo_flops": analytic,
                     "median_s": t[v]["median_s"], "timing": t[v], "gflops": g,
                     "fraction_of_peak": g / peak["gflops_median"], "agent_steps_per_s": B / t[v]["median_s"]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (ν=1, block 4, peak on 512×512)")
    ap.add_argument("--models", nargs="+", default=["mlp"], choices=("linear", "mlp", "cnn"))
    ap.add_argument("--nus", nargs="+", type=int, default=[1, 3])
    ap.add_argument("--methods", nargs="+", default=["exact", "fo"], choices=metagrad.METHODS)
    ap.add_argument("--blocks", nargs="+", type=int, default=[32, 128])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--variants", nargs="+", default=None, choices=("stacked", "vmap", "chunked", "loop", "baseline"),
                    help="engine backends and/or the baseline loop (default: the engine's default strategy, vmap, "
                         "baseline)")
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds per configuration (>= 3 repeats)")
    ap.add_argument("--peak-n", type=int, default=2048, help="size of the reference matmul (default 2048)")
    ap.add_argument("--peak-repeats", type=int, default=10)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", default="auto",
                    help='torch threads on CPU: N, 0 = torch default, or "auto" (default) = the cores not kept busy by '
                         'other processes (load average), see common.choose_threads')
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/flops.json)")
    args = ap.parse_args(argv)
    default = common.default_strategy()
    if args.variants is None:
        args.variants = list(dict.fromkeys([default, "vmap", "baseline"]))
    if args.quick:
        args.nus, args.blocks, args.methods, args.peak_n, args.repeats, args.peak_repeats = [1], [4], ["exact", "fo"], 512, 2, 3
    device = common.pick_device(args.device)
    threads = common.choose_threads(args.threads, device)
    info = common.machine_info(device)
    info["threads_choice"] = threads["reason"]
    print(f"device {device} ({info['device_name']}), torch {info['torch_version']}, {info['torch_threads']} torch threads ({threads['reason']})")
    t_start = time.perf_counter()
    peak = matmul_peak(device, args.peak_n, args.peak_repeats)
    print(f"reference: {args.peak_n}×{args.peak_n} float32 matmul, median {peak['gflops_median']:.1f} GFLOP/s "
          f"(best {peak['gflops_best']:.1f})")

    rows = []
    for model, nu, method, B in itertools.product(args.models, args.nus, args.methods, args.blocks):
        rows += measure_config(model, nu, method, B, args, device, peak)
        print(f"  measured {model} ν={nu} {method} B={B}: " +
              ", ".join(f"{r['variant']} {r['gflops']:.1f} GFLOP/s" for r in rows[-len(args.variants):]), flush=True)

    cols = [("model", "model", ""), ("nu", "ν", ""), ("method", "method", ""), ("B", "B", ""), ("variant", "variant", ""),
            ("flops_per_agent", "MFLOP/agent", "{:.1f}"), ("median_s", "s/call", "{:.4f}"), ("gflops", "GFLOP/s", "{:.2f}"),
            ("fraction_of_peak", "% of peak", "{:.1%}")]
    disp = [dict(r, flops_per_agent=r["flops_per_agent"] / 1e6) for r in rows]
    print(f"\nachieved FLOP/s (FlopCounterMode, matmul/conv FLOPs only) vs the matmul reference "
          f"{peak['gflops_median']:.1f} GFLOP/s")
    print(common.table(disp, cols))
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {"default_strategy": default}
    common.finish("flops", args.out, info, t_start, {
        "flop_count": "torch.utils.flop_counter.FlopCounterMode on one call (matmul/bmm/conv only; fo checked "
                      "against the analytic count)", "peak_reference": peak, "settings": settings, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

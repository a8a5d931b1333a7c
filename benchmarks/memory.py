#!/usr/bin/env python
"""Peak memory of one block meta-gradient call versus ν.

Variants (MLP 784-80-60-10, a block of 32 agents, batch 32, float32):
  unrolled  exact meta-gradient by differentiating through the unrolled inner loop
            (``block_meta_gradients(..., unrolled=True)``, MAML-style; memory grows with the graph)
  exact     exact meta-gradient by the backward HVP recursion (the engine's default)
  recompute the same recursion with the fine-tuned iterates recomputed, not stored (train.recompute)
  fo        first-order (Hessian terms dropped)
  hf        Hessian-free finite differences (``--variants`` only)
  baseline  the per-agent autograd loop of benchmarks/baseline.py, exact (one agent alive at a time)

Each configuration runs in a FRESH subprocess so that nothing from an earlier one is counted.
The child builds the problem, makes one warm-up call, frees it, then measures one call:
  CPU : peak RSS growth. The child resets the kernel's peak-RSS mark (``echo 5 >
        /proc/self/clear_refs``), reads VmRSS, runs the call and reads VmHWM; the increase is the
        memory the call needed (its result included). glibc is told to serve every allocation of
        64 KiB and more by mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors really leave the RSS.
        Where clear_refs is not writable, a 1 ms sampling thread estimates the peak instead.
  CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the memory
        allocated before the call.

    python benchmarks/memory.py            # ν ∈ {1,2,3,5,10}, 4 variants (about 2 minutes on 2 cores)
    python benchmarks/memory.py --quick    # ν=1, block 4
    python benchmarks/memory.py --nus 1 5 10 20 --block 128 --variants unrolled exact fo hf
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

VARIANTS = ("unrolled", "exact", "recompute", "fo", "hf", "baseline")
RATIO_TARGET = 2.0
ALPHA, DELTA = 0.01, 1e-3


# --------------------------------------------------------------------------- child
def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    """Fallback: sample VmRSS every millisecond."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, False

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, _status_kib("VmRSS") or 0)
            time.sleep(0.001)


def child(args) -> dict:
    import torch
    from baseline import LoopBaseline

    if int(args.threads) > 0:
        torch.set_num_threads(int(args.threads))
    device = common.pick_device(args.device)
    method = {"unrolled": "exact", "baseline": "exact", "recompute": "exact"}.get(args.variant, args.variant)
    p = common.Problem(args.model, args.block, args.nu, method, batch=args.batch, device=device)
    if args.variant == "baseline":
        base = LoopBaseline(p.model)

        def call():
            return base.block_meta_gradients(p.params, p.X, p.Y, p.idx, args.nu, ALPHA, "exact", DELTA)
    else:
        call = common.engine_block(p, "vmap", alpha=ALPHA, delta=DELTA, unrolled=args.variant == "unrolled",
                                   recompute=args.variant == "recompute")

    out = call()                       # warm-up: one-time allocations (kernels, thread pools, caches)
    del out
    gc.collect()
    result_mb = p.num_params * args.block * p.X.element_size() / 2**20
    peaks, method_used = [], None
    t0 = time.perf_counter()
    for _ in range(args.calls):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            out = call()
            torch.cuda.synchronize(device)
            peaks.append((torch.cuda.max_memory_allocated(device) - before) / 2**20)
            method_used = "torch.cuda.max_memory_allocated"
        else:
            sampler = None
            if _reset_peak():
                before = _status_kib("VmRSS")
                out = call()
                peak = _status_kib("VmHWM")
                method_used = "VmHWM after clear_refs=5"
            else:
                before = _status_kib("VmRSS")
                sampler = _Sampler()
                sampler.start()
                out = call()
                sampler.stop = True
                sampler.join()
                peak = max(sampler.peak, _status_kib("VmRSS"))
                method_used = "VmRSS sampled every 1 ms"
            peaks.append((peak - before) / 1024.0)
        del out
    return {"variant": args.variant, "nu": args.nu, "B": args.block, "model": args.model, "batch": args.batch,
            "device": str(device), "peak_mb": max(peaks), "peak_mb_calls": peaks, "result_mb": result_mb,
            "num_params": p.num_params, "seconds_per_call": (time.perf_counter() - t0) / args.calls,
            "measure": method_used, "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- parent
def assess(by: dict, nu: int) -> dict:
    """Exact (stored iterates, and recomputed) over first-order peak memory at the largest ν."""
    targets = {}
    for variant, what in (("exact", "exact-recursive"), ("recompute", "exact with train.recompute")):
        if by.get((variant, nu)) and by.get(("fo", nu)):
            targets[f"{variant}_over_fo"] = common.target(
                f"{what} / fo peak memory at ν={nu} <= {RATIO_TARGET}", by[(variant, nu)] / by[("fo", nu)],
                RATIO_TARGET, at_most=True, nu=nu)
    return targets


def run_child(args, variant: str, nu: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--variant", variant, "--nu", str(nu),
           "--block", str(args.block), "--model", args.model, "--batch", str(args.batch), "--device", args.device,
           "--calls", str(args.calls), "--threads", str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return {"variant": variant, "nu": nu, "error": " | ".join(tail) or f"exit {r.returncode}"}
    row = json.loads(r.stdout.strip().splitlines()[-1])
    row["subprocess_s"] = time.perf_counter() - t0
    return row


def plot(rows, path, args, device_label) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    labels = {"unrolled": "exact, unrolled graph", "exact": "exact, HVP recursion",
              "recompute": "exact, recursion with recomputed iterates (train.recompute)", "fo": "first-order",
              "hf": "Hessian-free", "baseline": "baseline loop (exact)"}
    for v in args.variants:
        pts = sorted((r["nu"], r["peak_mb"]) for r in rows if r["variant"] == v and "peak_mb" in r)
        if pts:
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=labels.get(v, v))
    ax.set_xlabel("ν (fine-tuning steps inside the meta-objective)")
    ax.set_ylabel("peak memory of one call (MiB)")
    ax.set_title(f"{args.model}, block of {args.block} agents, batch {args.batch} — {device_label}", fontsize=9)
    ax.set_xticks(sorted({r["nu"] for r in rows}))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def ratios(by: dict, rows: list[dict], nu: int, variants: list[str]) -> dict:
    """One line of the table: every variant's peak at ν, exact/fo, recompute/fo, unrolled/exact, exact in B·d copies."""
    t = {"nu": nu, **{v: by.get((v, nu)) for v in variants}}
    for name, a, b in (("exact/fo", "exact", "fo"), ("recompute/fo", "recompute", "fo"),
                       ("unrolled/exact", "unrolled", "exact")):
        if by.get((a, nu)) and by.get((b, nu)):
            t[name] = by[(a, nu)] / by[(b, nu)]
    if by.get(("exact", nu)):
        t["exact_copies"] = by[("exact", nu)] / next(r["result_mb"] for r in rows
                                                     if r.get("variant") == "exact" and r["nu"] == nu)
    return t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: ν=1, block 4, unrolled and fo")
    ap.add_argument("--nus", nargs="+", type=int, default=[1, 2, 3, 5, 10])
    ap.add_argument("--variants", nargs="+", default=["unrolled", "exact", "recompute", "fo", "baseline"],
                    choices=VARIANTS)
    ap.add_argument("--model", default="mlp", choices=("linear", "mlp", "cnn"))
    ap.add_argument("--block", type=int, default=32, help="agents per block (default 32)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--calls", type=int, default=2, help="measured calls per configuration; the max is reported")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", default="auto",
                    help='torch threads of the children on CPU: N, 0 = torch default, or "auto" (default: the cores '
                         'not kept busy by other processes, see common.choose_threads)')
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per child")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/memory.json); PNG alongside")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="exact", help=argparse.SUPPRESS)
    ap.add_argument("--nu", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    if args.quick:
        args.nus, args.block, args.variants, args.calls = [1], 4, ["unrolled", "fo"], 1
    device = common.pick_device(args.device)
    args.device = device.type
    threads = common.choose_threads(args.threads, device)
    args.threads = str(threads["threads"]) if device.type == "cpu" else "0"
    info = common.machine_info(device)
    info["threads_choice"] = threads["reason"]
    print(f"device {device} ({info['device_name']}), torch {info['torch_version']}, {info['cpu_count']} CPUs, "
          f"{args.threads} torch threads per child ({threads['reason']})")
    t_start = time.perf_counter()
    rows = []
    for nu in args.nus:
        for v in args.variants:
            r = run_child(args, v, nu)
            rows.append(r)
            msg = f"{r['peak_mb']:.1f} MiB ({r['seconds_per_call']:.2f} s/call)" if "peak_mb" in r else f"ERROR {r['error']}"
            print(f"  ν={nu:>2} {v:>9}: {msg}", flush=True)

    by = {(r["variant"], r["nu"]): r.get("peak_mb") for r in rows}
    table_rows = [ratios(by, rows, nu, args.variants) for nu in args.nus]
    cols = [("nu", "ν", "")] + [(v, v + " MiB", "{:.1f}") for v in args.variants]
    cols += [("exact/fo", "exact/fo", "{:.2f}"), ("recompute/fo", "recompute/fo", "{:.2f}"),
             ("unrolled/exact", "unrolled/exact", "{:.2f}"),
             ("exact_copies", "exact in B·d copies", "{:.1f}")]
    measure = next((r["measure"] for r in rows if "measure" in r), "?")
    res_mb = next((r["result_mb"] for r in rows if "result_mb" in r), float("nan"))
    print(f"\npeak memory of one call ({args.model}, block {args.block}, batch {args.batch}; {measure}); "
          f"one copy of the block's parameters B·d = {res_mb:.2f} MiB")
    print(common.table(table_rows, cols))

    targets = assess(by, max(args.nus))
    print()
    common.print_targets(targets, args.quick)
    out = common.out_path(args.out, "memory")
    png = plot(rows, os.path.splitext(out)[0] + ".png", args, f"{info['device']} ({info['device_name']})")
    settings = {"model": args.model, "block": args.block, "batch": args.batch, "nus": args.nus,
                "variants": args.variants, "calls": args.calls, "dtype": "float32", "strategy": "vmap",
                "measure": measure, "child_env": "MALLOC_MMAP_THRESHOLD_=65536"}
    common.finish("memory", args.out, info, t_start, {
        "unit": "MiB (peak growth during one block_meta_gradients call)", "quick": args.quick, "settings": settings,
        "rows": rows, "table": table_rows, "targets": targets, "plot": png})
    return 0 if all("peak_mb" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""How the exact meta-gradient's Hessian-vector products are formed: the engine against a
stand-alone reverse-over-reverse recursion, eagerly and through torch.compile.

On the same block and batches:

  baseline     the per-agent autograd loop of benchmarks/baseline.py (double backward)
  engine_vmap  the engine's vmap backend (metagrad.hvp_exact: the vjp of the gradient)
  vmap_rr      a stand-alone copy of the recursion with reverse-over-reverse HVPs (vjp of grad), vmapped
  compiled_rr  vmap_rr through torch.compile (the compile time is reported separately)

and checks that the candidates agree with the engine (relative error of the stacked
meta-gradients): what torch.compile would gain on the engine's own formulation.

    python benchmarks/hvp_variants.py                  # mlp, ν ∈ {1, 3}, block 32, with torch.compile
    python benchmarks/hvp_variants.py --no-compile     # eager only (seconds)
    python benchmarks/hvp_variants.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from torch.func import grad, grad_and_value, vjp, vmap  # noqa: E402

import common  # noqa: E402
from baseline import LoopBaseline  # noqa: E402

ALPHA = 0.01


def _axpy(a, x, y):
    return {k: y[k] + a * x[k] for k in y}


def _batch(X, Y, idx, mask, s):
    s = 0 if idx.shape[0] == 1 else s
    rows = idx[s]
    return X[rows], Y[rows], mask[s]


def agent_meta_gradient_rr(loss, params, X, Y, idx, mask, nu: int, alpha: float):
    """The engine's exact recursion with H·v = vjp(grad f)(v) (reverse-over-reverse)."""
    g_fn = grad(loss)
    thetas = [params]
    for l in range(nu):
        thetas.append(_axpy(-alpha, g_fn(thetas[-1], *_batch(X, Y, idx, mask, l)), thetas[-1]))
    g, value = grad_and_value(loss)(thetas[nu], *_batch(X, Y, idx, mask, nu))
    for l in reversed(range(nu)):
        b = _batch(X, Y, idx, mask, nu + 1 + l)
        _, pullback = vjp(lambda p: g_fn(p, *b), thetas[l])
        g = _axpy(-alpha, pullback(g)[0], g)
    return g, value


def compile_into(row: dict, fns: dict, rr, p, ref, device) -> None:
    """``rr`` through torch.compile as fns["compiled_rr"] (its compile time and error vs the engine in
    ``row``), or the compile error in ``row``."""
    comp = torch.compile(rr, dynamic=False)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = comp(p.params, p.idx, p.mask, p.X, p.Y)
        common.sync(device)
    except Exception as e:   # noqa: BLE001 - report, do not hide
        row["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        return
    row["compile_s"] = time.perf_counter() - t0
    row["rel_err_vs_engine"]["compiled_rr"] = common.rel_err(out[0], ref)
    fns["compiled_rr"] = lambda: comp(p.params, p.idx, p.mask, p.X, p.Y)


def measure_nu(nu: int, args, device) -> dict:
    p = common.Problem(args.model, args.block, nu, "exact", batch=args.batch, device=device)
    base = LoopBaseline(p.model)
    rr = vmap(lambda a, i, m, X, Y: agent_meta_gradient_rr(p.loss, a, X, Y, i, m, nu, ALPHA),
              in_dims=(0, 0, 0, None, None))
    fns = {"baseline": lambda: base.block_meta_gradients(p.params, p.X, p.Y, p.idx, nu, ALPHA, "exact"),
           "engine_vmap": common.engine_block(p, "vmap", alpha=ALPHA),
           "vmap_rr": lambda: rr(p.params, p.idx, p.mask, p.X, p.Y)}
    ref = fns["engine_vmap"]()[0]
    row = {"model": args.model, "nu": nu, "B": args.block, "batch": args.batch,
           "rel_err_vs_engine": {"vmap_rr": common.rel_err(fns["vmap_rr"]()[0], ref),
                                 "baseline": common.rel_err(fns["baseline"]()[0], ref)}}
    if args.compile:
        compile_into(row, fns, rr, p, ref, device)
    t = common.interleaved(fns, device, args.repeats, args.budget)
    row["timings"] = t
    for k, v in t.items():
        row[f"{k}_aps"] = args.block / v["median_s"]
        if k != "baseline":
            row[f"{k}_speedup"] = row[f"{k}_aps"] / row["baseline_aps"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: ν=1, block 4, no compile")
    ap.add_argument("--model", default="mlp", choices=("linear", "mlp", "cnn"))
    ap.add_argument("--nus", nargs="+", type=int, default=[1, 3])
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=30.0)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", default="auto", help='torch threads on CPU: N, 0 = torch default, or "auto" (default)')
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/hvp_variants.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.nus, args.block, args.compile, args.repeats = [1], 4, False, 2
    device = common.pick_device(args.device)
    threads = common.choose_threads(args.threads, device)
    info = common.machine_info(device)
    info["threads_choice"] = threads["reason"]
    print(f"device {device} ({info['device_name']}), torch {info['torch_version']}, "
          f"{info['torch_threads']} torch threads ({threads['reason']})")
    t_start = time.perf_counter()
    rows = []
    for nu in args.nus:
        rows.append(measure_nu(nu, args, device))
        print(f"  measured ν={nu}: " + ", ".join(f"{k} {rows[-1][k + '_aps']:.1f}" for k in rows[-1]["timings"]),
              flush=True)

    cols = [("nu", "ν", ""), ("B", "B", ""), ("baseline_aps", "baseline", "{:.1f}"), ("engine_vmap_aps", "engine vmap", "{:.1f}"),
            ("vmap_rr_aps", "vmap rr", "{:.1f}"), ("compiled_rr_aps", "compiled rr", "{:.1f}"),
            ("engine_vmap_speedup", "engine×", "{:.2f}"), ("vmap_rr_speedup", "rr×", "{:.2f}"),
            ("compiled_rr_speedup", "compiled rr×", "{:.2f}"), ("compile_s", "compile s", "{:.0f}")]
    print(f"\nexact meta-gradient, {args.model}, agent·meta-steps per second (× = over the baseline loop)")
    print(common.table(rows, cols))
    for r in rows:
        errs = ", ".join(f"{k} {v:.1e}" for k, v in r["rel_err_vs_engine"].items())
        print(f"  ν={r['nu']}: relative error vs the engine: {errs}" + (f"; compile failed: {r['compile_error']}"
                                                                         if "compile_error" in r else ""))
    common.finish("hvp_variants", args.out, info, t_start, {
        "unit": "agent·meta-steps per second", "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

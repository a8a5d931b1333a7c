#!/usr/bin/env python
"""Throughput of the batched meta-gradients: agent·meta-steps per second.

Compares the engine's execution strategies (``vmap``: one batched torch.func pass over the block;
``chunked``: vmap over chunks; ``loop``: the engine's per-agent autograd loop; ``auto``: what
``mpifedmeta.strategy`` picks by timing the candidates) against a BASELINE written here
(benchmarks/baseline.py) the way other FL simulators compute: a Python loop over agents on one
regular nn.Module with torch.autograd.grad (double backward for the Hessian-vector products).

Every configuration times all variants INTERLEAVED (baseline, loop, vmap, chunked, baseline, ...)
so that a noisy machine slows them alike; the figure is the median over the repeats after one
warm-up call each. Throughput = agents in the block / median seconds of one block call.

    python benchmarks/throughput.py                 # representative default grid (a few minutes on 2 cores)
    python benchmarks/throughput.py --full          # every model × ν × method × block size
    python benchmarks/throughput.py --quick         # a tiny smoke run (seconds)
    python benchmarks/throughput.py --models mlp --nus 1 3 --methods exact --blocks 32 128
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


import common  # noqa: E402
from baseline import LoopBaseline  # noqa: E402
from mpifedmeta import metagrad  # noqa: E402

try:                                          # the engine's automatic strategy choice (optional)
    from mpifedmeta import strategy as _strategy_mod
except ImportError:                           # pragma: no cover - older engine
    _strategy_mod = None

ALPHA, BETA, DELTA = 0.01, 0.001, 1e-3
E2E = {"model": "mlp", "nu": 3, "method": "exact", "B": 32, "tau": 10}
SPEEDUP_TARGET = 3.0


def default_grid() -> list[tuple]:
    """(model, ν, method, B): every ν for the MLP, the methods and block sizes at ν = 3, and
    enough of the linear model and the CNN to show where vmap wins and where it loses."""
    g = [("mlp", nu, "exact", 32) for nu in (0, 1, 3, 5, 10)]
    g += [("mlp", 3, m, 32) for m in ("fo", "hf")]
    g += [("mlp", 3, "exact", B) for B in (8, 128)]
    g += [("linear", nu, "exact", 32) for nu in (1, 3)]
    g += [("cnn", 1, m, 8) for m in ("exact", "fo")]
    return g


def full_grid(models, nus, methods, blocks) -> list[tuple]:
    out = []
    for model, nu, method, B in itertools.product(models, nus, methods, blocks):
        if nu == 0 and method != "exact":      # ν = 0: every method is the FedAvg gradient
            continue
        out.append((model, nu, method, B))
    return out


# --------------------------------------------------------------------------- auto strategy
def auto_available() -> str | None:
    if _strategy_mod is None:
        return None
    if hasattr(_strategy_mod, "select_strategy"):
        return "select_strategy"
    if hasattr(_strategy_mod, "measure"):
        return "measure"
    return None


def resolve_auto(p: common.Problem, device, chunk: int) -> dict:
    """Ask the engine which strategy it would use for this block (as ``train.strategy = "auto"``)."""
    kind = auto_available()
    t0 = time.perf_counter()
    if kind == "measure":
        def step(cand, ch):
            metagrad.block_meta_gradients(p.loss, p.params, p.X, p.Y, p.idx, p.mask, p.nu, ALPHA, p.method,
                                          DELTA, cand, ch)
        choice = _strategy_mod.measure(step, device, chunk, p.B)
        strat, ch = choice.strategy, choice.chunk
    elif kind == "select_strategy":
        fn = _strategy_mod.select_strategy
        known = {"loss": p.loss, "params": p.params, "X": p.X, "Y": p.Y, "idx": p.idx, "mask": p.mask,
                 "nu": p.nu, "alpha": ALPHA, "method": p.method, "metagrad": p.method, "delta": DELTA,
                 "device": device, "chunk": chunk, "block": p.B, "block_size": p.B, "model": p.model,
                 "model_name": p.model_name, "batch_size": p.batch}
        sig = inspect.signature(fn)
        kwargs = {k: known[k] for k in sig.parameters if k in known}
        missing = [k for k, v in sig.parameters.items() if k not in known and v.default is inspect._empty
                   and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
        if missing:
            return {"strategy": None, "error": f"select_strategy needs {missing}"}
        r = fn(**kwargs)
        strat = r if isinstance(r, str) else getattr(r, "strategy", r[0] if isinstance(r, tuple) else None)
        ch = getattr(r, "chunk", r[1] if isinstance(r, tuple) and len(r) > 1 else chunk)
    else:
        return {"strategy": None, "error": "mpifedmeta.strategy not available"}
    return {"strategy": strat, "chunk": ch, "via": f"mpifedmeta.strategy.{kind}",
            "selection_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------- measurements
def agreement_check(models, methods, device) -> list[dict]:
    """Baseline vs engine (vmap) on a small block: relative error of the stacked meta-gradients."""
    rows = []
    for model in models:
        for method in methods:
            p = common.Problem(model, 4, 2, method, device=device, seed=1)
            ours, v1 = metagrad.block_meta_gradients(p.loss, p.params, p.X, p.Y, p.idx, p.mask, 2, ALPHA, method, DELTA)
            base, v2 = LoopBaseline(p.model).block_meta_gradients(p.params, p.X, p.Y, p.idx, 2, ALPHA, method, DELTA)
            err = common.rel_err(ours, base)
            lerr = float(((v1 - v2).abs() / v2.abs().clamp_min(1e-30)).max())
            rows.append({"model": model, "method": method, "nu": 2, "B": 4, "rel_err_grad": err,
                         "rel_err_loss": lerr, "ok": err <= 1e-4 and lerr <= 1e-4})
    return rows


def interleaved(fns: dict, device, repeats: int, budget_s: float) -> dict:
    """Warm up every variant once, then time them in turn; fewer repeats (>= 3) when over budget."""
    warm = {}
    for name, fn in fns.items():
        common.sync(device)
        t0 = time.perf_counter()
        fn()
        common.sync(device)
        warm[name] = time.perf_counter() - t0
    per_round = sum(warm.values())
    n = repeats if per_round * repeats <= budget_s else max(3, min(repeats, int(budget_s / max(per_round, 1e-9))))
    samples = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            common.sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            common.sync(device)
            samples[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s), "repeats": n,
                   "cpu_s_median": statistics.median(cpu[name]), "warmup_s": warm[name], "samples_s": s}
            for name, s in samples.items()}


def engine_call(p: common.Problem, strategy: str, chunk: int):
    """One block call of the engine with ``strategy`` ('compiled' = vmap with compile=True)."""
    if strategy == "compiled":
        if "compile" not in inspect.signature(metagrad.block_meta_gradients).parameters:
            raise SystemExit("--strategies compiled: this engine's block_meta_gradients has no compile option")
        return lambda: metagrad.block_meta_gradients(p.loss, p.params, p.X, p.Y, p.idx, p.mask, p.nu, ALPHA,
                                                     p.method, DELTA, "vmap", chunk, compile=True)
    return lambda: metagrad.block_meta_gradients(p.loss, p.params, p.X, p.Y, p.idx, p.mask, p.nu, ALPHA,
                                                 p.method, DELTA, strategy, chunk)


def measure_config(model, nu, method, B, args, device, strategies) -> dict:
    p = common.Problem(model, B, nu, method, batch=args.batch, device=device)
    base = LoopBaseline(p.model)
    fns = {"baseline": lambda: base.block_meta_gradients(p.params, p.X, p.Y, p.idx, nu, ALPHA, method, DELTA)}
    row = {"model": model, "nu": nu, "method": method, "B": B, "batch": args.batch, "num_params": p.num_params}
    for s in strategies:
        if s == "chunked" and args.chunk >= B:
            row["chunked_note"] = f"chunk {args.chunk} >= block {B}: identical to vmap, not timed"
            continue
        fns[s] = engine_call(p, s, args.chunk)
    auto = None
    if args.auto and auto_available():
        auto = resolve_auto(p, device, args.chunk)
        row["auto"] = auto
        s = auto.get("strategy")
        if s and s not in fns:
            fns[s] = (lambda s=s: metagrad.block_meta_gradients(p.loss, p.params, p.X, p.Y, p.idx, p.mask, nu,
                                                                ALPHA, method, DELTA, s, auto.get("chunk", args.chunk)))
    with warnings.catch_warnings(record=True) as caught:   # e.g. the engine's torch.compile fallback
        warnings.simplefilter("always")
        t = interleaved(fns, device, args.repeats, args.budget)
    if caught:
        row["warnings"] = sorted({str(w.message)[:300] for w in caught})
    row["timings"] = t
    for name, v in t.items():
        row[f"{name}_aps"] = B / v["median_s"]
    for name in t:
        if name != "baseline":
            row[f"{name}_speedup"] = row[f"{name}_aps"] / row["baseline_aps"]
    if auto and auto.get("strategy") in t:
        row["auto_aps"] = row[f"{auto['strategy']}_aps"]
        row["auto_speedup"] = row["auto_aps"] / row["baseline_aps"]
        row["auto_choice"] = auto["strategy"]
    return row


def measure_e2e(args, device, strategies) -> dict:
    """local_update over τ steps (the whole local round of a block) vs the baseline doing the same."""
    c = dict(E2E, tau=args.tau, B=args.e2e_block)
    p = common.Problem(c["model"], c["B"], c["nu"], c["method"], batch=args.batch, device=device, local_steps=c["tau"])
    base = LoopBaseline(p.model)
    fns = {"baseline": lambda: base.local_update(p.params, p.X, p.Y, p.idx, c["nu"], ALPHA, BETA, c["method"], DELTA)}
    for s in strategies:
        if s == "chunked" and args.chunk >= c["B"]:
            continue
        kw = {"compile": True} if s == "compiled" else {}
        fns[s] = (lambda s=s, kw=kw: metagrad.local_update(p.loss, p.params, p.X, p.Y, p.idx, p.mask, c["nu"], ALPHA,
                                                           BETA, c["method"], DELTA, "vmap" if s == "compiled" else s,
                                                           args.chunk, **kw))
    # the engine and the baseline must end at the same local models
    ours, _ = fns["vmap"]() if "vmap" in fns else metagrad.local_update(
        p.loss, p.params, p.X, p.Y, p.idx, p.mask, c["nu"], ALPHA, BETA, c["method"], DELTA)
    theirs, _ = fns["baseline"]()
    # compare the displacements w_final − w (the models themselves differ by less than float32 resolution)
    moved = lambda q: {k: q[k] - p.params[k] for k in q}   # noqa: E731
    row = dict(c, batch=args.batch, num_params=p.num_params, rel_err_models=common.rel_err(moved(ours), moved(theirs)))
    if args.auto and auto_available():
        p1 = common.Problem(c["model"], c["B"], c["nu"], c["method"], batch=args.batch, device=device)
        row["auto"] = resolve_auto(p1, device, args.chunk)
    t = interleaved(fns, device, args.repeats, args.budget * 2)
    row["timings"] = t
    steps = c["B"] * c["tau"]
    for name, v in t.items():
        row[f"{name}_aps"] = steps / v["median_s"]
    for name in t:
        if name != "baseline":
            row[f"{name}_speedup"] = row[f"{name}_aps"] / row["baseline_aps"]
    ch = row.get("auto", {}).get("strategy")
    if ch in t:
        row["auto_choice"], row["auto_aps"] = ch, row[f"{ch}_aps"]
        row["auto_speedup"] = row["auto_aps"] / row["baseline_aps"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="tiny smoke run: mlp ν=1, block 4, vmap (+auto) vs baseline, 2 repeats; end-to-end with 4 agents, τ=2")
    ap.add_argument("--full", action="store_true", help="the full grid: --models × --nus × --methods × --blocks")
    ap.add_argument("--models", nargs="+", default=None, choices=("linear", "mlp", "cnn"),
                    help="models of a custom/full grid (default of --full: all three)")
    ap.add_argument("--nus", nargs="+", type=int, default=None, help="ν values (default of --full: 0 1 3 5 10)")
    ap.add_argument("--methods", nargs="+", default=None, choices=metagrad.METHODS, help="default of --full: exact fo hf")
    ap.add_argument("--blocks", nargs="+", type=int, default=None, help="agents per block (default of --full: 8 32 128)")
    ap.add_argument("--batch", type=int, default=32, help="samples per batch (default 32)")
    ap.add_argument("--strategies", nargs="+", default=["vmap", "chunked", "loop"],
                    choices=("vmap", "chunked", "loop", "compiled"),
                    help="engine strategies to time (default: vmap chunked loop); 'compiled' = vmap through "
                         "torch.compile (block_meta_gradients(compile=True)); its compile time is the warm-up")
    ap.add_argument("--no-auto", dest="auto", action="store_false", help="skip the engine's auto strategy choice")
    ap.add_argument("--chunk", type=int, default=16, help="agents per vmap call of the chunked strategy (default 16)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per variant after one warm-up (default 5)")
    ap.add_argument("--budget", type=float, default=20.0,
                    help="seconds per configuration: fewer repeats (>= 3) when the warm-up shows more (default 20)")
    ap.add_argument("--tau", type=int, default=10, help="local steps τ of the end-to-end row (default 10)")
    ap.add_argument("--e2e-block", type=int, default=E2E["B"], help=f"agents of the end-to-end row (default {E2E['B']})")
    ap.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the end-to-end local_update row")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--threads", default="auto",
                    help='torch threads on CPU: N, 0 = torch default, or "auto" (default) = the cores not kept busy by '
                         'other processes (load average), see common.choose_threads')
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/throughput.json)")
    ap.add_argument("--agreement-only", action="store_true",
                    help="only the start-up check baseline vs engine for --models/--methods; exit 1 on a mismatch")
    args = ap.parse_args(argv)

    device = common.pick_device(args.device)
    threads = common.choose_threads(args.threads, device)
    if args.quick:
        grid = [("mlp", 1, "exact", 4)]
        args.repeats, args.budget, args.tau, args.e2e_block, args.strategies = 2, 5.0, 2, 4, ["vmap"]
    elif args.full or any(v is not None for v in (args.models, args.nus, args.methods, args.blocks)):
        grid = full_grid(args.models or ["linear", "mlp", "cnn"], args.nus or [0, 1, 3, 5, 10],
                         args.methods or list(metagrad.METHODS), args.blocks or [8, 32, 128])
    else:
        grid = default_grid()
    info = common.machine_info(device)
    info["threads_choice"] = threads["reason"]
    info["loadavg_start"] = os.getloadavg()
    print(f"device {device} ({info['device_name']}), torch {info['torch_version']}, "
          f"{info['cpu_count']} CPUs, {info['torch_threads']} torch threads ({threads['reason']})")
    print(f"auto strategy: {'mpifedmeta.strategy.' + auto_available() if auto_available() else 'not available'}")
    t_start = time.perf_counter()

    models = sorted({g[0] for g in grid} | ({"mlp"} if not args.agreement_only else set())) if not args.quick else ["mlp"]
    methods = sorted({g[2] for g in grid})
    check = agreement_check(models, methods, device)
    print("\nagreement baseline vs engine (float32, ν=2, 4 agents; tolerance 1e-4 relative):")
    for r in check:
        print(f"  {r['model']:>6} {r['method']:>5}: meta-gradient rel. err {r['rel_err_grad']:.2e}, "
              f"meta-loss rel. err {r['rel_err_loss']:.2e}  {'OK' if r['ok'] else 'MISMATCH'}")
    if not all(r["ok"] for r in check):
        print("warning: the baseline disagrees with the engine beyond 1e-4; timings compare different computations")
    if args.agreement_only:
        path = common.write_json(common.out_path(args.out, "agreement"), {"benchmark": "agreement", "machine": info,
                                                                          "agreement": check})
        print(f"wrote {path}")
        return 0 if all(r["ok"] for r in check) else 1

    rows = []
    for model, nu, method, B in grid:
        row = measure_config(model, nu, method, B, args, device, args.strategies)
        rows.append(row)
        print(f"  measured {model} ν={nu} {method} B={B}: baseline {row['baseline_aps']:.1f}, vmap "
              f"{row.get('vmap_aps', float('nan')):.1f} agent·steps/s", flush=True)
    e2e = measure_e2e(args, device, args.strategies) if args.e2e else None

    cols = [("model", "model", ""), ("nu", "ν", ""), ("method", "method", ""), ("B", "B", ""),
            ("baseline_aps", "baseline", "{:.1f}"), ("loop_aps", "loop", "{:.1f}"), ("vmap_aps", "vmap", "{:.1f}"),
            ("chunked_aps", "chunked", "{:.1f}"), ("compiled_aps", "compiled", "{:.1f}"), ("auto_choice", "auto→", ""), ("vmap_speedup", "vmap×", "{:.2f}"),
            ("auto_speedup", "auto×", "{:.2f}")]
    print("\nagent·meta-steps per second (median; × = speedup over the baseline loop)")
    print(common.table(rows, cols))
    for r in rows:
        for w in r.get("warnings", []):
            print(f"  note ({r['model']} ν={r['nu']} {r['method']} B={r['B']}): {w}")
    if e2e:
        print(f"\nend-to-end local round: {e2e['model']} ν={e2e['nu']} {e2e['method']}, {e2e['B']} agents, τ={e2e['tau']} "
              f"(local_update vs baseline; the models' displacements agree to {e2e['rel_err_models']:.1e})")
        print(common.table([e2e], cols[4:]))
    wall = time.perf_counter() - t_start
    targets = {}
    if e2e:
        best = max((k for k in ("vmap", "chunked", "auto") if f"{k}_speedup" in e2e), key=lambda k: e2e[f"{k}_speedup"])
        targets["e2e_speedup"] = {"target": f">= {SPEEDUP_TARGET}x over the per-agent loop (MLP, ν=3, {e2e['B']} agents, τ={e2e['tau']})",
                                  "measured_vmap": e2e.get("vmap_speedup"), "measured_auto": e2e.get("auto_speedup"),
                                  "met": bool(e2e.get("vmap_speedup", 0) >= SPEEDUP_TARGET),
                                  "best_strategy": best, "best": e2e[f"{best}_speedup"]}
        print(f"\ntarget: end-to-end vmap speedup >= {SPEEDUP_TARGET}x: measured {e2e.get('vmap_speedup', float('nan')):.2f}x "
              f"-> {'MET' if targets['e2e_speedup']['met'] else 'MISSED'}")
    info["loadavg_end"] = os.getloadavg()
    payload = {"benchmark": "throughput", "unit": "agent·meta-steps per second", "machine": info,
               "settings": {"alpha": ALPHA, "beta": BETA, "delta": DELTA, "batch": args.batch, "chunk": args.chunk,
                            "repeats": args.repeats, "budget_s": args.budget, "quick": args.quick, "full": args.full,
                            "dtype": "float32", "data": "random MNIST-shaped (1,28,28), 10 classes, 128 samples/agent",
                            "strategies": args.strategies, "auto": auto_available() if args.auto else None},
               "agreement": check, "rows": rows, "end_to_end": e2e, "targets": targets, "wall_s": wall}
    path = common.write_json(common.out_path(args.out, "throughput"), payload)
    print(f"\nwrote {path} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

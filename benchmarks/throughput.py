#!/usr/bin/env python
"""Throughput of the batched meta-gradients: agent·meta-steps per second.

Compares the engine's backends (``train.strategy``; the list is taken from the engine, so a backend
this checkout lacks is skipped: ``stacked``: models with a leading agent axis, one autograd graph for
the whole block; ``vmap``: one batched torch.func pass over the block; ``chunked``: vmap over chunks;
``loop``: the engine's per-agent autograd loop; ``auto``: what ``mpifedmeta.engine.strategy`` picks by
timing the candidates) against a BASELINE written here
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
from mpifedmeta.core import metagrad  # noqa: E402

ALPHA, BETA, DELTA = 0.01, 0.001, 1e-3
E2E = {"model": "mlp", "nu": 3, "method": "exact", "B": 32, "tau": 5}
SPEEDUP_TARGET = 5.0       # issue 11: exact ν = 3, MLP, 32 agents, τ = 5, >= 5x the per-agent autograd loop


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
    try:
        from mpifedmeta.engine import strategy as strat
    except ImportError:                       # pragma: no cover - older engine
        return None
    return "measure" if hasattr(strat, "measure") else None


def resolve_auto(p: common.Problem, device, chunk: int) -> dict:
    """Ask the engine which strategy it would use for this block (as ``train.strategy = "auto"``)."""
    return common.engine_auto(p, device, chunk, ALPHA, DELTA)


def default_strategy() -> str:
    """The engine's default ``train.strategy`` (what a run uses when the config does not say)."""
    from mpifedmeta.run import config
    return config.SCHEMA["train"]["strategy"].default


# --------------------------------------------------------------------------- measurements
def agreement_check(models, methods, strategies, device) -> list[dict]:
    """Baseline vs each engine backend on a small block: relative error of the stacked meta-gradients."""
    rows = []
    for model in models:
        for method in methods:
            p = common.Problem(model, 4, 2, method, device=device, seed=1)
            base, v2 = LoopBaseline(p.model).block_meta_gradients(p.params, p.X, p.Y, p.idx, 2, ALPHA, method, DELTA)
            for strategy in strategies:
                try:
                    ours, v1 = common.engine_block(p, strategy, 2, ALPHA, DELTA)()
                except common.Unavailable:
                    continue
                err = common.rel_err(ours, base)
                lerr = float(((v1 - v2).abs() / v2.abs().clamp_min(1e-30)).max())
                rows.append({"model": model, "method": method, "strategy": strategy, "nu": 2, "B": 4,
                             "rel_err_grad": err, "rel_err_loss": lerr, "ok": err <= 1e-4 and lerr <= 1e-4})
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
    """One block call of the engine with ``strategy``; raises common.Unavailable if it cannot run.
    'compiled' = the default backend with whole-round capture (train.compile = "compile"), one local step."""
    if strategy == "compiled":
        one = common.Problem(p.model_name, p.B, p.nu, p.method, batch=p.batch, device=p.device, local_steps=1)
        return common.engine_local_update(one, default_strategy(), chunk, ALPHA, BETA, DELTA, compiled=True)
    return common.engine_block(p, strategy, chunk, ALPHA, DELTA)


def measure_config(model, nu, method, B, args, device, strategies) -> dict:
    p = common.Problem(model, B, nu, method, batch=args.batch, device=device)
    base = LoopBaseline(p.model)
    fns = {"baseline": lambda: base.block_meta_gradients(p.params, p.X, p.Y, p.idx, nu, ALPHA, method, DELTA)}
    row = {"model": model, "nu": nu, "method": method, "B": B, "batch": args.batch, "num_params": p.num_params}
    for s in strategies:
        if s == "chunked" and args.chunk >= B:
            row["chunked_note"] = f"chunk {args.chunk} >= block {B}: identical to vmap, not timed"
            continue
        try:
            fns[s] = engine_call(p, s, args.chunk)
        except common.Unavailable as e:
            row[f"{s}_note"] = str(e)
    auto = None
    if args.auto and auto_available():
        auto = resolve_auto(p, device, args.chunk)
        row["auto"] = auto
        s = auto.get("strategy")
        if s and s not in fns:
            fns[s] = common.engine_block(p, s, auto.get("chunk", args.chunk), ALPHA, DELTA)
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
        if "loop_aps" in row:
            row["auto_vs_loop"] = row["auto_aps"] / row["loop_aps"]
    return row


def measure_e2e(args, device, strategies) -> dict:
    """local_update over τ steps (the whole local round of a block) vs the baseline doing the same."""
    c = dict(E2E, tau=args.tau, B=args.e2e_block)
    p = common.Problem(c["model"], c["B"], c["nu"], c["method"], batch=args.batch, device=device, local_steps=c["tau"])
    base = LoopBaseline(p.model)
    fns = {"baseline": lambda: base.local_update(p.params, p.X, p.Y, p.idx, c["nu"], ALPHA, BETA, c["method"], DELTA)}
    notes = {}
    for s in strategies:
        if s == "chunked" and args.chunk >= c["B"]:
            continue
        try:
            base_s = default_strategy() if s == "compiled" else s
            fns[s] = common.engine_local_update(p, base_s, args.chunk, ALPHA, BETA, DELTA, compiled=s == "compiled")
        except common.Unavailable as e:
            notes[s] = str(e)
    # the engine and the baseline must end at the same local models
    ours, _ = fns[next(s for s in fns if s != "baseline")]()
    theirs, _ = fns["baseline"]()
    # compare the displacements w_final − w (the models themselves differ by less than float32 resolution)
    moved = lambda q: {k: q[k] - p.params[k] for k in q}   # noqa: E731
    row = dict(c, batch=args.batch, num_params=p.num_params, rel_err_models=common.rel_err(moved(ours), moved(theirs)),
               notes=notes)
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
    ap.add_argument("--strategies", nargs="+", default=None,
                    choices=("stacked", "vmap", "chunked", "loop", "compiled"),
                    help="engine backends to time (default: every one this engine has, "
                         f"{' '.join(common.engine_strategies())}); one it lacks is skipped with a note; "
                         "'compiled' = the vmap path through torch.compile; its compile time is the warm-up")
    ap.add_argument("--no-auto", dest="auto", action="store_false", help="skip the engine's auto strategy choice")
    ap.add_argument("--chunk", type=int, default=16, help="agents per vmap call of the chunked strategy (default 16)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per variant after one warm-up (default 5)")
    ap.add_argument("--budget", type=float, default=20.0,
                    help="seconds per configuration: fewer repeats (>= 3) when the warm-up shows more (default 20)")
    ap.add_argument("--tau", type=int, default=E2E["tau"], help=f"local steps τ of the end-to-end row (default {E2E['tau']})")
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
    if args.strategies is None:
        args.strategies = list(common.engine_strategies())
    if args.quick:
        grid = [("mlp", 1, "exact", 4)]
        args.repeats, args.budget, args.tau, args.e2e_block = 2, 5.0, 2, 4
        args.strategies = sorted({"vmap", default_strategy()} & set(common.engine_strategies()))
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
    print(f"engine backends: {', '.join(common.engine_strategies())} (default {default_strategy()}); timed: "
          f"{', '.join(args.strategies)}; auto strategy: "
          f"{'mpifedmeta.engine.strategy.' + auto_available() if auto_available() else 'not available'}")
    t_start = time.perf_counter()

    models = sorted({g[0] for g in grid} | ({"mlp"} if not args.agreement_only else set())) if not args.quick else ["mlp"]
    methods = sorted({g[2] for g in grid})
    check = agreement_check(models, methods, [s for s in args.strategies if s != "compiled"], device)
    print("\nagreement baseline vs engine (float32, ν=2, 4 agents; tolerance 1e-4 relative):")
    for r in check:
        print(f"  {r['model']:>6} {r['method']:>5} {r['strategy']:>8}: meta-gradient rel. err {r['rel_err_grad']:.2e}, "
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
        print(f"  measured {model} ν={nu} {method} B={B}: baseline {row['baseline_aps']:.1f}, " +
              ", ".join(f"{s} {row[s + '_aps']:.1f}" for s in args.strategies if s + "_aps" in row) +
              f" agent·steps/s; auto → {row.get('auto_choice', '–')}", flush=True)
    e2e = measure_e2e(args, device, args.strategies) if args.e2e else None

    shown = [x for x in ("stacked", "vmap", "chunked", "loop", "compiled") if any(f"{x}_aps" in r for r in rows + [e2e or {}])]
    cols = ([("model", "model", ""), ("nu", "ν", ""), ("method", "method", ""), ("B", "B", ""),
             ("baseline_aps", "baseline", "{:.1f}")] + [(f"{x}_aps", x, "{:.1f}") for x in shown] +
            [("auto_choice", "auto→", "")] + [(f"{x}_speedup", f"{x}×", "{:.2f}") for x in shown if x != "loop"] +
            [("auto_speedup", "auto×", "{:.2f}"), ("auto_vs_loop", "auto/loop", "{:.2f}")])
    print("\nagent·meta-steps per second (median; × = speedup over the baseline per-agent autograd loop; "
          "auto/loop = auto's choice over the engine's loop backend)")
    print(common.table(rows, cols))
    for r in rows:
        for w in r.get("warnings", []):
            print(f"  note ({r['model']} ν={r['nu']} {r['method']} B={r['B']}): {w}")
        for x in ("stacked", "vmap", "chunked", "loop", "compiled"):
            if f"{x}_note" in r:
                print(f"  {x} not timed ({r['model']} ν={r['nu']} {r['method']} B={r['B']}): {r[x + '_note']}")
    if e2e:
        print(f"\nend-to-end local round: {e2e['model']} ν={e2e['nu']} {e2e['method']}, {e2e['B']} agents, τ={e2e['tau']} "
              f"(local_update vs baseline; the models' displacements agree to {e2e['rel_err_models']:.1e})")
        print(common.table([e2e], cols[4:-1]))
        for x, why in e2e.get("notes", {}).items():
            print(f"  {x} not timed: {why}")
    wall = time.perf_counter() - t_start
    targets = {}
    if e2e:
        default = default_strategy()
        cands = [k for k in ("stacked", "vmap", "chunked", "loop", "auto") if f"{k}_speedup" in e2e]
        best = max(cands, key=lambda k: e2e[f"{k}_speedup"]) if cands else None
        measured = e2e.get(f"{default}_speedup")
        targets["e2e_speedup"] = {"target": f">= {SPEEDUP_TARGET}x over the per-agent autograd loop (MLP, ν=3 exact, "
                                            f"{e2e['B']} agents, τ={e2e['tau']}), engine default strategy",
                                  "default_strategy": default, "measured": measured,
                                  "measured_auto": e2e.get("auto_speedup"),
                                  "met": bool(measured is not None and measured >= SPEEDUP_TARGET),
                                  "best_strategy": best, "best": e2e[f"{best}_speedup"] if best else None}
        print(f"\ntarget: end-to-end speedup of the default strategy ({default}) >= {SPEEDUP_TARGET}x: measured "
              f"{measured if measured is not None else float('nan'):.2f}x (best: {best} "
              f"{targets['e2e_speedup']['best'] or float('nan'):.2f}x) -> {'MET' if targets['e2e_speedup']['met'] else 'MISSED'}")
    cnn = [r for r in rows if r["model"] == "cnn" and "auto_aps" in r]
    if cnn:
        worst = min(cnn, key=lambda r: r["auto_speedup"])
        worst_loop = min((r for r in cnn if "auto_vs_loop" in r), key=lambda r: r["auto_vs_loop"], default=None)
        targets["cnn_auto_never_slower"] = {
            "target": "CNN under auto never slower than the per-agent loop (baseline)",
            "measured_min_auto_vs_baseline": worst["auto_speedup"], "at": f"ν={worst['nu']} {worst['method']} B={worst['B']}",
            "auto_choice": worst["auto_choice"],
            "measured_min_auto_vs_engine_loop": worst_loop["auto_vs_loop"] if worst_loop else None,
            "met": bool(worst["auto_speedup"] >= 1.0)}
        for r in cnn:
            print(f"CNN ν={r['nu']} {r['method']} B={r['B']}: auto → {r['auto_choice']}, {r['auto_speedup']:.2f}× the "
                  f"baseline loop" + (f", {r['auto_vs_loop']:.2f}× the engine's loop backend" if "auto_vs_loop" in r else ""))
        print(f"target: CNN never slower than the loop under auto: worst {worst['auto_speedup']:.2f}× "
              f"({targets['cnn_auto_never_slower']['at']}, auto → {worst['auto_choice']}) -> "
              f"{'MET' if targets['cnn_auto_never_slower']['met'] else 'MISSED'}")
    info["loadavg_end"] = os.getloadavg()
    payload = {"benchmark": "throughput", "unit": "agent·meta-steps per second", "machine": info,
               "settings": {"alpha": ALPHA, "beta": BETA, "delta": DELTA, "batch": args.batch, "chunk": args.chunk,
                            "repeats": args.repeats, "budget_s": args.budget, "quick": args.quick, "full": args.full,
                            "dtype": "float32", "data": "random MNIST-shaped (1,28,28), 10 classes, 128 samples/agent",
                            "strategies": args.strategies, "engine_strategies": list(common.engine_strategies()),
                            "default_strategy": default_strategy(), "auto": auto_available() if args.auto else None},
               "agreement": check, "rows": rows, "end_to_end": e2e, "targets": targets, "wall_s": wall}
    path = common.write_json(common.out_path(args.out, "throughput"), payload)
    print(f"load average at start {info['loadavg_start'][0]:.2f}, at end {info['loadavg_end'][0]:.2f}")
    print(f"\nwrote {path} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

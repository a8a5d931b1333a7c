#!/usr/bin/env python
"""Throughput of the batched meta-gradients: agent·meta-steps per second.

Compares the engine's backends (``train.strategy``: ``stacked``: the block as one model whose
parameters carry the agent axis, one autograd graph; ``vmap``: one batched torch.func pass over
the block; ``chunked``: vmap over chunks; ``loop``: one agent at a time on a resident module;
``auto``: what ``mpifedmeta.engine.strategy`` picks by timing the candidates; optionally
``compiled``: the default backend with the whole local round through torch.compile) against a
BASELINE (benchmarks/baseline.py) written the way other FL simulators compute: a Python loop over
agents on one regular nn.Module with torch.autograd.grad (double backward for the HVPs).

Every configuration times all variants INTERLEAVED (baseline, stacked, vmap, ..., baseline, ...)
so that a noisy machine slows them alike; the figure is the median over the repeats after one
warm-up call each. Throughput = agents in the block / median seconds of one block call; the
end-to-end row = agents × τ / seconds of one whole local round (``local_update``).

Targets (printed and in the JSON): end to end (MLP 784-80-60-10, ν = 3 exact, 32 agents, τ = 5)
the default strategy >= 2.5× the baseline; every CNN row under ``auto`` >= 1.0× the baseline.

Besides the MNIST-shaped models (linear, mlp, cnn: random 1×28×28 images), the benchmarks' models of
other tasks (:data:`SHAPED`): ``cnn-cifar`` (FedAvg's CNN on 3×32×32, fc 512), ``char-lstm`` (LEAF's
Shakespeare model: 80 characters, embedding 8, LSTM 256-256, 80 classes) and ``transformer`` (80
characters, width 64, 2 pre-norm blocks, 4 heads, causal), their token ids carried in the run's
float dtype as a run does.

    python benchmarks/throughput.py                 # representative default grid (~15 min on 2 cores, ~12 of them
                                                    # the cnn-cifar / char-lstm / transformer rows)
    python benchmarks/throughput.py --models char-lstm transformer cnn-cifar --nus 1 --methods exact --blocks 8 --no-e2e
    python benchmarks/throughput.py --full          # every model × ν × method × block size
    python benchmarks/throughput.py --quick         # a tiny smoke run (seconds)
    python benchmarks/throughput.py --models mlp --nus 1 3 --methods exact --blocks 32 128
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common  # noqa: E402
from baseline import LoopBaseline  # noqa: E402
from mpifedmeta.core import metagrad, reference  # noqa: E402
from mpifedmeta.models import build_model, param_dict  # noqa: E402

ALPHA, BETA, DELTA = 0.01, 0.001, 1e-3
E2E = {"model": "mlp", "nu": 3, "method": "exact", "B": 32, "tau": 5}
E2E_TARGET = 2.5           # end to end, the engine's default strategy over the baseline
CNN_TARGET = 1.0           # every CNN row under auto over the baseline
VARIANTS = ("stacked", "vmap", "chunked", "loop", "compiled")

#: The benchmarks' models of other inputs: name → (model.name, input shape, classes, model.hidden, [model]
#: keys, token vocabulary or None for images).
SHAPED = {
    "cnn-cifar": ("cnn", (3, 32, 32), 10, (512,), {}, None),
    "char-lstm": ("char-lstm", (80,), 80, (256, 256), {"embedding": 8}, 80),
    "transformer": ("transformer", (80,), 80, None, {"width": 64, "depth": 2, "heads": 4, "causal": True}, 80),
}
MODELS = ("linear", "mlp", "cnn") + tuple(SHAPED)


class ShapedProblem(common.Problem):
    """:class:`common.Problem` (same attributes) for a model of :data:`SHAPED`: random images of its
    shape, or random token ids (float, as a run carries them; the model's embedding takes them)."""

    def __init__(self, model_name: str, B: int, nu: int, method: str, batch: int = 32, device="cpu",
                 dtype=torch.float32, samples_per_agent: int = 128, local_steps: int | None = None,
                 seed: int = 0, hidden=None):
        name, shape, classes, default_hidden, options, vocab = SHAPED[model_name]
        g = torch.Generator().manual_seed(seed)
        self.model_name, self.B, self.nu, self.method, self.batch = model_name, B, nu, method, batch
        self.device, self.dtype = torch.device(device), dtype
        torch.manual_seed(seed)
        self.model = build_model(name, shape, classes, hidden or default_hidden, options).to(dtype)
        self.model.requires_grad_(False)
        self.loss = reference.make_loss(self.model)
        S = samples_per_agent
        X = torch.randint(0, vocab, (B * S,) + shape, generator=g) if vocab else torch.rand((B * S,) + shape, generator=g)
        self.X = X.to(device=device, dtype=dtype)
        self.Y = torch.randint(0, classes, (B * S,), generator=g).to(device)
        slots = metagrad.num_slots(nu, method)
        idx_shape = (B, slots, batch) if local_steps is None else (B, local_steps, slots, batch)
        offsets = (torch.arange(B) * S).view((B,) + (1,) * (len(idx_shape) - 1))
        self.idx = (offsets + torch.randint(0, S, idx_shape, generator=g)).to(device)
        self.mask = torch.ones(idx_shape, dtype=dtype, device=device)
        w = {k: v.to(device) for k, v in param_dict(self.model).items()}
        self.params = {k: v.unsqueeze(0).expand((B,) + v.shape).clone() for k, v in w.items()}
        self.num_params = sum(v.numel() for v in w.values())


def problem(model_name: str, *args, **kw) -> common.Problem:
    """The benchmark problem of ``model_name`` (MNIST-shaped, or one of :data:`SHAPED`)."""
    return (ShapedProblem if model_name in SHAPED else common.Problem)(model_name, *args, **kw)


def default_grid() -> list[tuple]:
    """(model, ν, method, B): every ν for the MLP, the methods and block sizes at ν = 3, and
    enough of the linear model and the CNN to show where batching wins and where it loses."""
    g = [("mlp", nu, "exact", 32) for nu in (0, 1, 3, 5, 10)]
    g += [("mlp", 3, m, 32) for m in ("fo", "hf")]
    g += [("mlp", 3, "exact", B) for B in (8, 128)]
    g += [("linear", nu, "exact", 32) for nu in (1, 3)]
    g += [("cnn", 1, m, 8) for m in ("exact", "fo")]
    g += [(m, 1, "exact", 8) for m in SHAPED]         # CIFAR CNN, char-LSTM, transformer
    return g


def full_grid(models, nus, methods, blocks) -> list[tuple]:
    return [(model, nu, method, B) for model, nu, method, B in itertools.product(models, nus, methods, blocks)
            if nu > 0 or method == "exact"]      # ν = 0: every method is the FedAvg gradient


# --------------------------------------------------------------------------- measurements
def agreement_check(models, methods, strategies, device) -> list[dict]:
    """Baseline vs each engine backend on a small block: relative error of the stacked meta-gradients."""
    rows = []
    for model in models:
        for method in methods:
            p = problem(model, 4, 2, method, device=device, seed=1)
            base, v2 = LoopBaseline(p.model).block_meta_gradients(p.params, p.X, p.Y, p.idx, 2, ALPHA, method, DELTA)
            for strategy in strategies:
                ours, v1 = common.engine_block(p, strategy, 2, ALPHA, DELTA)()
                err = common.rel_err(ours, base)
                lerr = float(((v1 - v2).abs() / v2.abs().clamp_min(1e-30)).max())
                rows.append({"model": model, "method": method, "strategy": strategy, "nu": 2, "B": 4,
                             "rel_err_grad": err, "rel_err_loss": lerr, "ok": err <= 1e-4 and lerr <= 1e-4})
    return rows


def engine_call(p: common.Problem, strategy: str, chunk: int):
    """One block call of the engine with ``strategy``; 'compiled' = the default backend with
    whole-round capture (train.compile = "compile"), one local step."""
    if strategy == "compiled":
        one = problem(p.model_name, p.B, p.nu, p.method, batch=p.batch, device=p.device, local_steps=1)
        return common.engine_local_update(one, common.default_strategy(), chunk, ALPHA, BETA, DELTA, compiled=True)
    return common.engine_block(p, strategy, chunk, ALPHA, DELTA)


def timed(row: dict, fns: dict, device, repeats: int, budget: float, steps: int) -> dict:
    """Time ``fns`` interleaved; throughputs (``steps`` agent·meta-steps per call) and × over the baseline."""
    with warnings.catch_warnings(record=True) as caught:   # e.g. the engine's torch.compile fallback
        warnings.simplefilter("always")
        t = common.interleaved(fns, device, repeats, budget)
    if caught:
        row["warnings"] = sorted({str(w.message)[:300] for w in caught})
    row["timings"] = t
    for name, v in t.items():
        row[f"{name}_aps"] = steps / v["median_s"]
    for name in t:
        if name != "baseline":
            row[f"{name}_speedup"] = row[f"{name}_aps"] / row["baseline_aps"]
    choice = row.get("auto", {}).get("strategy")
    if choice in t:
        row["auto_choice"], row["auto_aps"] = choice, row[f"{choice}_aps"]
        row["auto_speedup"] = row["auto_aps"] / row["baseline_aps"]
        if "loop_aps" in row:
            row["auto_vs_loop"] = row["auto_aps"] / row["loop_aps"]
    return row


def measure_config(model, nu, method, B, args, device) -> dict:
    p = problem(model, B, nu, method, batch=args.batch, device=device)
    base = LoopBaseline(p.model)
    fns = {"baseline": lambda: base.block_meta_gradients(p.params, p.X, p.Y, p.idx, nu, ALPHA, method, DELTA)}
    row = {"model": model, "nu": nu, "method": method, "B": B, "batch": args.batch, "num_params": p.num_params}
    for s in args.strategies:
        if s == "chunked" and args.chunk >= B:
            row["chunked_note"] = f"chunk {args.chunk} >= block {B}: identical to vmap, not timed"
            continue
        fns[s] = engine_call(p, s, args.chunk)
    if args.auto:
        row["auto"] = common.engine_auto(p, device, args.chunk, ALPHA, DELTA)
        s = row["auto"]["strategy"]
        if s not in fns:
            fns[s] = common.engine_block(p, s, row["auto"]["chunk"], ALPHA, DELTA)
    return timed(row, fns, device, args.repeats, args.budget, B)


def measure_e2e(args, device) -> dict:
    """local_update over τ steps (the whole local round of a block) vs the baseline doing the same."""
    c = dict(E2E, tau=args.tau, B=args.e2e_block)
    p = common.Problem(c["model"], c["B"], c["nu"], c["method"], batch=args.batch, device=device, local_steps=c["tau"])
    base = LoopBaseline(p.model)
    fns = {"baseline": lambda: base.local_update(p.params, p.X, p.Y, p.idx, c["nu"], ALPHA, BETA, c["method"], DELTA)}
    for s in args.strategies:
        if s == "chunked" and args.chunk >= c["B"]:
            continue
        fns[s] = common.engine_local_update(p, common.default_strategy() if s == "compiled" else s, args.chunk,
                                            ALPHA, BETA, DELTA, compiled=s == "compiled")
    # the engine and the baseline must end at the same local models: compare the displacements
    # w_final − w (the models themselves differ by less than float32 resolution)
    moved = lambda q: {k: q[k] - p.params[k] for k in q}   # noqa: E731
    ours, theirs = fns[next(s for s in fns if s != "baseline")]()[0], fns["baseline"]()[0]
    row = dict(c, batch=args.batch, num_params=p.num_params, rel_err_models=common.rel_err(moved(ours), moved(theirs)))
    if args.auto:
        one = common.Problem(c["model"], c["B"], c["nu"], c["method"], batch=args.batch, device=device)
        row["auto"] = common.engine_auto(one, device, args.chunk, ALPHA, DELTA)
    return timed(row, fns, device, args.repeats, args.budget * 2, c["B"] * c["tau"])


# --------------------------------------------------------------------------- targets and output
def assess(rows: list[dict], e2e: dict | None) -> dict:
    targets = {}
    if e2e:
        default = common.default_strategy()
        auto = f"auto → {e2e['auto_choice']} {e2e['auto_speedup']:.2f}×" if "auto_speedup" in e2e else "auto not timed"
        targets["e2e_speedup"] = common.target(
            f"end to end, MLP 784-80-60-10, ν=3 exact, {e2e['B']} agents, τ={e2e['tau']}: default strategy "
            f"({default}) >= {E2E_TARGET}x baseline.py", e2e.get(f"{default}_speedup"), E2E_TARGET, fmt="{:.2f}×",
            strategy=default, detail=f"{default}; {auto}")
    cnn = [r for r in rows if r["model"] == "cnn" and "auto_speedup" in r]
    if cnn:
        worst = min(cnn, key=lambda r: r["auto_speedup"])
        loop = f"; {worst['auto_vs_loop']:.2f}× the engine's loop backend" if "auto_vs_loop" in worst else ""
        targets["cnn_auto"] = common.target(
            f"CNN under auto >= {CNN_TARGET}x the baseline loop (worst row)", worst["auto_speedup"], CNN_TARGET,
            fmt="{:.2f}×", detail=f"ν={worst['nu']} {worst['method']} B={worst['B']}, auto → {worst['auto_choice']}{loop}")
    return targets


def print_agreement(check: list[dict]) -> None:
    print("\nagreement baseline vs engine (float32, ν=2, 4 agents; tolerance 1e-4 relative):")
    for r in check:
        print(f"  {r['model']:>11} {r['method']:>5} {r['strategy']:>8}: meta-gradient rel. err {r['rel_err_grad']:.2e}, "
              f"meta-loss rel. err {r['rel_err_loss']:.2e}  {'OK' if r['ok'] else 'MISMATCH'}")
    if not all(r["ok"] for r in check):
        print("warning: the baseline disagrees with the engine beyond 1e-4; timings compare different computations")


def print_tables(rows: list[dict], e2e: dict | None) -> None:
    shown = [x for x in VARIANTS if any(f"{x}_aps" in r for r in rows + [e2e or {}])]
    cols = ([("model", "model", ""), ("nu", "ν", ""), ("method", "method", ""), ("B", "B", ""),
             ("baseline_aps", "baseline", "{:.1f}")] + [(f"{x}_aps", x, "{:.1f}") for x in shown] +
            [("auto_choice", "auto→", "")] + [(f"{x}_speedup", f"{x}×", "{:.2f}") for x in shown] +
            [("auto_speedup", "auto×", "{:.2f}"), ("auto_vs_loop", "auto/loop", "{:.2f}")])
    print("\nagent·meta-steps per second (median; × = over the baseline per-agent autograd loop; "
          "auto/loop = auto's choice over the engine's loop backend)")
    print(common.table(rows, cols))
    for r in rows:
        for w in r.get("warnings", []):
            print(f"  note ({r['model']} ν={r['nu']} {r['method']} B={r['B']}): {w}")
        if "chunked_note" in r:
            print(f"  chunked ({r['model']} ν={r['nu']} {r['method']} B={r['B']}): {r['chunked_note']}")
    if e2e:
        print(f"\nend-to-end local round: {e2e['model']} ν={e2e['nu']} {e2e['method']}, {e2e['B']} agents, τ={e2e['tau']} "
              f"(local_update vs baseline; the models' displacements agree to {e2e['rel_err_models']:.1e})")
        print(common.table([e2e], cols[4:-1]))


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: mlp ν=1, block 4, the default backend "
                    "and vmap (+auto) vs baseline, 2 repeats; end-to-end with 4 agents, τ=2")
    ap.add_argument("--full", action="store_true", help="the full grid: --models × --nus × --methods × --blocks")
    ap.add_argument("--models", nargs="+", default=None, choices=MODELS,
                    help="models of a custom/full grid (default of --full: linear mlp cnn; also: "
                         f"{' '.join(SHAPED)})")
    ap.add_argument("--nus", nargs="+", type=int, default=None, help="ν values (default of --full: 0 1 3 5 10)")
    ap.add_argument("--methods", nargs="+", default=None, choices=metagrad.METHODS, help="default of --full: exact fo hf")
    ap.add_argument("--blocks", nargs="+", type=int, default=None, help="agents per block (default of --full: 8 32 128)")
    ap.add_argument("--batch", type=int, default=32, help="samples per batch (default 32)")
    ap.add_argument("--strategies", nargs="+", default=list(common.engine_strategies()), choices=VARIANTS,
                    help=f"engine backends to time (default: {' '.join(common.engine_strategies())}); 'compiled' = "
                         "the default backend through torch.compile, its compile time is the warm-up")
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
    if args.quick:
        args.repeats, args.budget, args.tau, args.e2e_block = 2, 5.0, 2, 4
        args.strategies = sorted({"vmap", common.default_strategy()})
        return args, [("mlp", 1, "exact", 4)]
    if args.full or any(v is not None for v in (args.models, args.nus, args.methods, args.blocks)):
        return args, full_grid(args.models or ["linear", "mlp", "cnn"], args.nus or [0, 1, 3, 5, 10],
                               args.methods or list(metagrad.METHODS), args.blocks or [8, 32, 128])
    return args, default_grid()


def main(argv=None) -> int:
    args, grid = parse(argv)
    device = common.pick_device(args.device)
    threads = common.choose_threads(args.threads, device)
    info = common.machine_info(device)
    info["threads_choice"] = threads["reason"]
    t_start = time.perf_counter()
    print(f"device {device} ({info['device_name']}), torch {info['torch_version']}, {info['cpu_count']} CPUs, "
          f"{info['torch_threads']} torch threads ({threads['reason']}), load average {info['loadavg_start'][0]:.2f}")
    print(f"engine backends: {', '.join(common.engine_strategies())} (default {common.default_strategy()}); "
          f"timed: {', '.join(args.strategies)}" + ("; auto: mpifedmeta.engine.strategy.measure" if args.auto else ""))

    models = sorted({g[0] for g in grid} | ({"mlp"} if args.e2e and not args.agreement_only else set()))
    check = agreement_check(models, sorted({g[2] for g in grid}), [s for s in args.strategies if s != "compiled"],
                            device)
    print_agreement(check)
    if args.agreement_only:
        common.finish("agreement", args.out, info, t_start, {"agreement": check})
        return 0 if all(r["ok"] for r in check) else 1

    rows = []
    for model, nu, method, B in grid:
        rows.append(measure_config(model, nu, method, B, args, device))
        r = rows[-1]
        print(f"  measured {model} ν={nu} {method} B={B}: baseline {r['baseline_aps']:.1f}, " +
              ", ".join(f"{s} {r[s + '_aps']:.1f}" for s in args.strategies if s + "_aps" in r) +
              f" agent·steps/s; auto → {r.get('auto_choice', '–')}", flush=True)
    e2e = measure_e2e(args, device) if args.e2e else None
    print_tables(rows, e2e)
    targets = assess(rows, e2e)
    print()
    common.print_targets(targets, args.quick)
    settings = {"alpha": ALPHA, "beta": BETA, "delta": DELTA, "batch": args.batch, "chunk": args.chunk,
                "repeats": args.repeats, "budget_s": args.budget, "full": args.full, "dtype": "float32",
                "data": "random MNIST-shaped (1,28,28), 10 classes, 128 samples/agent (SHAPED models: "
                        "their own shapes, ids)", "strategies": args.strategies,
                "default_strategy": common.default_strategy(), "auto": args.auto}
    common.finish("throughput", args.out, info, t_start, {
        "unit": "agent·meta-steps per second", "quick": args.quick, "settings": settings, "agreement": check,
        "rows": rows, "end_to_end": e2e, "targets": targets})
    return 0


if __name__ == "__main__":
    sys.exit(main())

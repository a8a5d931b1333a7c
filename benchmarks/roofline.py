#!/usr/bin/env python
"""Where a round's time goes, and how far it is from its floor.

For each work (whole training rounds of the engine, in this process, 1 rank, 1 torch thread):

    round          ms per round (median of --rounds rounds after warm-up), wall and CPU time
    GEMM share     share of the aten ops' self CPU time spent in bmm/baddbmm/mm/addmm (torch.profiler),
                   and the other big groups: elementwise, loss, gathers, exact sum, the rest; plus the
                   Python/dispatch time outside aten ops (wall − Σ self time)
    GEMM floor     the same GEMM calls (shapes and counts recorded by the profiler) timed alone
    passes         elements written per meta-step by non-GEMM ops into parameter-shaped tensors
                   ((B, *shape) of a parameter), in units of the block's B·d parameters: how often a
                   meta-step streams over the models besides the matrix products
    pass floor     those passes at the measured bandwidth of a fused add over a (B, d) block (read two
                   block-sized arrays, write one) — the cache level the engine really works in
    engine/floor   round time / (GEMM floor + pass floor)
    exact sum      share of the round spent in the exact sum, timed around it in unprofiled rounds

The works (peers.py's work, and the 784-feature MLP of throughput.py's end-to-end row):
    peers-fedavg   digits MLP 64-80-60-10, 100 agents, 32 per round, τ = 5, batch 32, ν = 0
    peers-fo       the same, first-order Per-FedAvg (ν = 1 fo)
    mnist-exact    MLP 784-80-60-10 on 5000 MNIST digits, 100 agents, 32 per round, τ = 5, ν = 3 exact

Targets (printed and in the JSON): GEMM >= 50% of the aten op time for the peers works, >= 65% for
mnist-exact; the exact sum <= 5% of a round in every work.

    python benchmarks/roofline.py            # ~1-2 minutes on 2 cores
    python benchmarks/roofline.py --quick    # smoke test (tiny sizes: its targets are not the real ones)
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time

import common
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

GEMM = ("aten::bmm", "aten::baddbmm", "aten::mm", "aten::addmm")
GROUPS = {
    "elementwise": ("aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::sub", "aten::sub_", "aten::div",
                    "aten::elu", "aten::elu_backward", "aten::relu", "aten::threshold_backward", "aten::tanh",
                    "aten::_foreach_add_", "aten::_foreach_add", "aten::_foreach_sub_", "aten::round_", "aten::where"),
    "loss": ("aten::_log_softmax", "aten::_log_softmax_backward_data", "aten::nll_loss_forward",
             "aten::nll_loss_backward", "aten::nll_loss2d_forward", "aten::nll_loss2d_backward", "aten::sum",
             "aten::clamp_min"),
    "gathers": ("aten::index_select", "aten::index", "aten::stack"),
    "copies": ("aten::copy_", "aten::clone", "aten::cat", "aten::contiguous"),
}
WORKS = {
    "peers-fedavg": ["data.num_agents=100", "train.agents_per_round=32", "train.local_steps=5", "train.nu=0",
                     "train.batch_size=32", "data.test_fraction=0.2"],
    "peers-fo": ["data.num_agents=100", "train.agents_per_round=32", "train.local_steps=5", "train.nu=1",
                 'train.metagrad="fo"', "train.batch_size=32", "data.test_fraction=0.2"],
    "mnist-exact": ['data.dataset="mnist5k"', "data.num_agents=100", "train.agents_per_round=32", "train.local_steps=5",
                    "train.nu=3", 'train.metagrad="exact"', "train.batch_size=32"],
}
GEMM_SHARE_TARGET = {"peers-fedavg": 0.50, "peers-fo": 0.50, "mnist-exact": 0.65}   # of the aten ops' self time
EXACT_SUM_TARGET = 0.05                                                              # of a round, at most


class ExactSumTimer:
    """Wall time spent in the exact sum (core.exactsum.encode_displacements, as the round calls it),
    timed without the profiler: the profiler's cost per op would inflate this region of small ops."""

    def __enter__(self):
        from mpifedmeta.federation import algorithm
        self.module, self.real, self.seconds = algorithm.exactsum, algorithm.exactsum.encode_displacements, 0.0

        def timed(*args):
            t0 = time.perf_counter()
            out = self.real(*args)
            self.seconds += time.perf_counter() - t0
            return out
        self.module.encode_displacements = timed
        return self

    def __exit__(self, *exc):
        self.module.encode_displacements = self.real


def time_rounds(step, w, rounds: int, warmup: int = 3) -> dict:
    for r in range(1, warmup + 1):
        w = step(w, r)
    wall, cpu = [], []
    with ExactSumTimer() as exact:
        for r in range(warmup + 1, warmup + 1 + rounds):
            t0, c0 = time.perf_counter(), time.process_time()
            w = step(w, r)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return {"round_ms": 1e3 * statistics.median(wall), "round_cpu_ms": 1e3 * statistics.median(cpu), "w": w,
            "exact_sum_ms": 1e3 * exact.seconds / rounds, "mean_round_ms": 1e3 * sum(wall) / rounds}


def profile_rounds(step, w, rounds: int, first: int) -> dict:
    """Self CPU time per aten op and per GEMM shape, per round; labelled engine regions."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for r in range(first, first + rounds):
            w = step(w, r)
        wall = time.perf_counter() - t0
    ops, gemms, regions = collections.Counter(), collections.Counter(), {}
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key.startswith("aten::"):
            ops[e.key] += e.self_cpu_time_total / rounds
            if e.key in GEMM:
                gemms[(e.key, str(e.input_shapes))] += e.count / rounds
        elif e.key.startswith("mpifedmeta."):
            regions[e.key] = regions.get(e.key, 0.0) + e.cpu_time_total / rounds / 1e3
    return {"ops_us": ops, "gemm_calls": gemms, "regions_ms": regions, "wall_ms": 1e3 * wall / rounds}


# --------------------------------------------------------------------------- floors
def gemm_floor_ms(gemm_calls: dict) -> float:
    """The recorded GEMM calls (op, shapes) × count, each shape timed alone (best of a few repeats)."""
    import ast
    total = 0.0
    for (op, shapes), count in gemm_calls.items():
        dims = [s for s in ast.literal_eval(shapes) if s]
        if op == "aten::bmm":
            a, b = torch.randn(dims[0]), torch.randn(dims[1])
            fn = lambda: torch.bmm(a, b)                                    # noqa: E731
        elif op == "aten::baddbmm":
            c, a, b = torch.randn(dims[0]), torch.randn(dims[1]), torch.randn(dims[2])
            fn = lambda: torch.baddbmm(c, a, b)                             # noqa: E731
        elif op == "aten::mm":
            a, b = torch.randn(dims[0]), torch.randn(dims[1])
            fn = lambda: torch.mm(a, b)                                     # noqa: E731
        else:
            c, a, b = torch.randn(dims[0]), torch.randn(dims[1]), torch.randn(dims[2])
            fn = lambda: torch.addmm(c, a, b)                               # noqa: E731
        fn()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(10):
                fn()
            best = min(best, (time.perf_counter() - t0) / 10)
        total += best * count
    return 1e3 * total


class ParamWrites(TorchDispatchMode):
    """Elements written by non-GEMM, non-view ops into tensors shaped like a stacked parameter."""

    def __init__(self, shapes: set):
        super().__init__()
        self.shapes, self.elements = shapes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and func.overloadpacket.__name__ not in ("bmm", "baddbmm", "mm", "addmm"):
            for t in (out if isinstance(out, (list, tuple)) else [out]):
                if isinstance(t, torch.Tensor) and tuple(t.shape) in self.shapes:
                    self.elements += t.numel()
        return out


def passes_per_meta_step(step, w, layout, B: int, d: int, tau: int) -> float:
    shapes = {(B,) + s for s in layout.shapes} | {(B, d)}
    with ParamWrites(shapes) as pw:
        step(w, 10_000)
    return pw.elements / (B * d) / tau


def block_bandwidth_gbs(B: int, d: int) -> float:
    """Bytes moved per second by a fused add over (B, d) float32 blocks (2 reads + 1 write)."""
    a, b, c = torch.randn(B, d), torch.randn(B, d), torch.empty(B, d)
    torch.add(a, b, alpha=-0.1, out=c)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(20):
            torch.add(a, b, alpha=-0.1, out=c)
        best = min(best, (time.perf_counter() - t0) / 20)
    return 3 * 4 * B * d / best / 1e9


# --------------------------------------------------------------------------- one work
def measure(name: str, overrides: list[str], rounds: int) -> dict:
    # one call per block (agent_chunk 0): the passes below are counted on (B, ...) tensors, and "auto" may
    # pick chunks of 16 on a busy machine (then nothing of shape (B, ...) is written: 0 passes)
    run = common.engine_rounds(overrides + ["train.threads=1", "train.agent_chunk=0"])
    step, w, layout = run.step, run.w0, run.layout
    B, d, tau = run.cfg.train.agents_per_round, w.numel(), run.cfg.train.local_steps
    t = time_rounds(step, w, rounds)
    p = profile_rounds(step, t["w"], max(3, rounds // 2), 1000)
    self_ms = sum(p["ops_us"].values()) / 1e3
    gemm_ms = sum(v for k, v in p["ops_us"].items() if k in GEMM) / 1e3
    groups = {g: sum(p["ops_us"].get(k, 0.0) for k in keys) / 1e3 for g, keys in GROUPS.items()}
    groups["other aten"] = self_ms - gemm_ms - sum(groups.values())
    passes = passes_per_meta_step(step, t["w"], layout, B, d, tau)
    bw = block_bandwidth_gbs(B, d)
    gfloor = gemm_floor_ms(p["gemm_calls"])
    pfloor = 1e3 * passes * tau * 3 * 4 * B * d / (bw * 1e9)
    row = {"work": name, "B": B, "d": d, "tau": tau, "round_ms": t["round_ms"], "round_cpu_ms": t["round_cpu_ms"],
           "profiled_round_ms": p["wall_ms"], "aten_self_ms": self_ms, "gemm_ms": gemm_ms,
           "gemm_share": gemm_ms / self_ms, "python_dispatch_ms": p["wall_ms"] - self_ms,
           "groups_ms": groups, "regions_ms": p["regions_ms"],
           "exact_sum_ms": t["exact_sum_ms"], "exact_sum_share": t["exact_sum_ms"] / t["mean_round_ms"],
           "gemm_floor_ms": gfloor, "passes_per_meta_step": passes, "block_bandwidth_gbs": bw,
           "pass_floor_ms": pfloor, "engine_over_floor": t["round_ms"] / (gfloor + pfloor),
           "top_ops_us": dict(p["ops_us"].most_common(12)), "strategy": run.strategy}
    return row


def assess(rows: list[dict]) -> dict:
    """GEMM share of every work, and the largest exact-sum share of a round."""
    targets = {f"gemm_share_{r['work']}": common.target(
        f"GEMM >= {GEMM_SHARE_TARGET[r['work']]:.0%} of the aten op time ({r['work']})", r["gemm_share"],
        GEMM_SHARE_TARGET[r["work"]], fmt="{:.1%}",
        detail=f"{r['gemm_ms']:.2f} of {r['aten_self_ms']:.2f} ms of aten ops per round") for r in rows}
    if rows:
        worst = max(rows, key=lambda r: r["exact_sum_share"])
        targets["exact_sum_share"] = common.target(
            f"exact sum <= {EXACT_SUM_TARGET:.0%} of a round (largest: {worst['work']})", worst["exact_sum_share"],
            EXACT_SUM_TARGET, at_most=True, fmt="{:.1%}", work=worst["work"],
            detail=f"{worst['work']}: {worst['exact_sum_ms']:.2f} ms of a {worst['round_ms']:.2f} ms round (timed "
                   "around the exact sum, no profiler)")
    return targets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--works", nargs="+", default=list(WORKS), choices=list(WORKS))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="3 rounds of each work, tiny sizes (smoke test)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    info = common.machine_info(common.pick_device("cpu"))
    t_all = time.perf_counter()
    works = dict(WORKS)
    if args.quick:
        args.rounds = 3
        works = {k: v + ["train.local_steps=2", "train.agents_per_round=8"] for k, v in WORKS.items()}
    rows = [measure(name, works[name], args.rounds) for name in args.works]
    print(f"1 rank, 1 torch thread, load average at start {info['loadavg_start'][0]:.2f}")
    print(common.table(rows, [("work", "work", ""), ("round_ms", "ms/round", "{:.2f}"),
                              ("gemm_share", "GEMM share", "{:.1%}"), ("gemm_floor_ms", "GEMM floor ms", "{:.2f}"),
                              ("passes_per_meta_step", "passes/meta-step", "{:.1f}"),
                              ("block_bandwidth_gbs", "GB/s", "{:.1f}"), ("pass_floor_ms", "pass floor ms", "{:.2f}"),
                              ("engine_over_floor", "engine/floor", "{:.2f}"),
                              ("exact_sum_share", "exact sum", "{:.1%}"),
                              ("python_dispatch_ms", "outside aten ms", "{:.2f}")]))
    for r in rows:
        parts = ", ".join(f"{g} {v:.2f}" for g, v in r["groups_ms"].items())
        print(f"{r['work']}: per round GEMM {r['gemm_ms']:.2f} ms, {parts} ms; outside aten ops "
              f"{r['python_dispatch_ms']:.2f} ms (profiled round {r['profiled_round_ms']:.2f} ms)")
    targets = assess(rows)
    common.print_targets(targets, args.quick)
    common.finish("roofline", args.out, info, t_all, {"rounds": args.rounds, "quick": args.quick, "rows": rows,
                                                      "targets": targets})
    return 0


if __name__ == "__main__":
    sys.exit(main())

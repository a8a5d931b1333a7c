#!/usr/bin/env python
"""What differential privacy costs per round: the same run with and without DP-FedAvg (clip + noise),
side by side in one process (1 torch thread), interleaved; where the DP time goes; what the accountant
costs on rank 0 after each round.

The works (whole rounds of the engine through ``common.engine_rounds``, set up as ``mpifedmeta run``
sets a run up, 1 rank, ``train.threads=1``, the default strategy, float32, CPU):

  digits-nu0    peers.py's work: the scikit-learn digits over 100 agents (``shards``, 2 classes per
                agent, 20% test split), MLP 64-80-60-10 ELU, 32 agents per round, τ = 5, batch 32,
                α = β = 0.05, ν = 0 (FedAvg)
  digits-fo     the same, ν = 1 fo (first-order Per-FedAvg)
  virtual-nu0   a large cohort of a generated population: ``virtual-shards`` agents over MNIST-5k
                (10^5 agents, 50 samples and 2 classes each), 1000 agents per round, MLP 784-80-60-10
                ELU, τ = 5, batch 10, ν = 0

The two variants of each work differ only in ``[privacy]``:

  off   privacy unset;
  dp    ``privacy.clip = C`` (default 1) and ``privacy.noise_multiplier = z`` (default 1), fixed-size
        cohorts (``privacy.sampling = "fixed"``, the cohorts of the ``off`` run: Poisson sampling would
        change the cohort size from round to round and with it the work being timed).

Measured per work:

  s/round      the median seconds of a round of each variant, timed alternately (one round of one, one
               of the other, ...; ``common.interleaved``) after ``--warmup`` rounds each;
  overhead     the median over the alternating pairs of (dp − off) / off (the target's figure), and the
               difference of the two medians over the off median (for comparison: noisier);
  clip, noise  where the DP time goes, in the timed rounds of the dp variant: the seconds per round in
               ``mechanism.clip_updates`` (what the ``mpifedmeta.clip`` profiler region of
               ``local_round`` holds: the L2 norm and the scaling of every agent's update, on its rank)
               and in ``mechanism.noise`` (the float64 Gaussian vector of the round, drawn in
               ``Round.run`` before ``server_step``), each timed around the call (no profiler), and
               their share of the off round; plus the profiler's regions (``mpifedmeta.local_update``,
               ``mpifedmeta.clip``, ``mpifedmeta.exact_sum``) over ``--profile-rounds`` rounds of the
               dp variant (the profiler inflates small ops: a cross-check, not the figure);
  clip alone   (information) the clip on one block of the round's agent-chunk shape: the engine's, the
               formulation before commit f2c01df, and the norms alone, accumulated in float64 and in float32
               (what clipping would still cost if its factor were folded into the exact sum's per-row scale).

The accountant (information, no target): ``mpifedmeta run`` composes one round into the ε ledger on
rank 0 after the round (``accountant.Ledger.advance``: compose + get_epsilon with Google's
``dp-accounting``), outside ``train/round_time``. Its seconds per round, over ``--accountant-rounds``
rounds, for each work's (N, m, z, δ = 1/N^1.1): RDP with Poisson sampling, RDP with fixed-size cohorts
(replace-one), PLD with Poisson sampling (PLD has no fixed-size event); and the start-up calibration of
``privacy.target_epsilon = 8`` for that many rounds (``accountant.calibrate``).

Target (printed and in the JSON): DP overhead <= 5% of the round, for each work.

    python benchmarks/privacy.py                       # the default works (~3-4 minutes on 2 idle cores)
    python benchmarks/privacy.py --works virtual-nu0 --large-cohort 2000
    python benchmarks/privacy.py --quick               # tiny smoke run (seconds)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import statistics
import sys
import time

import common  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

OVERHEAD_TARGET = 0.05          # DP's extra seconds per round, as a share of the round without DP, at most
CALIBRATE_EPSILON = 8.0         # the target ε whose start-up calibration is timed
REGIONS = ("mpifedmeta.local_update", "mpifedmeta.clip", "mpifedmeta.exact_sum", "mpifedmeta.allreduce")

#: name → label of the works
WORKS = {
    "digits-nu0": "digits, ν=0 (FedAvg)",
    "digits-fo": "digits, ν=1 fo (Per-FedAvg)",
    "virtual-nu0": "virtual MNIST-5k, ν=0",
}


def work_overrides(a, name: str) -> list[str]:
    """The ``--set``-style overrides of work ``name`` without ``[privacy]``."""
    every = ["train.threads=1", 'train.dtype="float32"', 'train.device="cpu"', 'train.weighting="uniform"',
             'server.optimizer="sgd"', "server.lr=1.0", "eval.every=1000000", f"train.seed={a.seed}",
             'model.name="mlp"', f"model.hidden={list(a.hidden)}", f"train.local_steps={a.tau}",
             f"train.alpha={a.alpha}", f"train.beta={a.beta}", 'algorithm.name="meta"']
    if name.startswith("digits"):
        nu = ["train.nu=0"] if name == "digits-nu0" else ["train.nu=1", 'train.metagrad="fo"']
        return every + nu + ['data.dataset="digits"', f"data.num_agents={a.agents}", "data.holdout_agents=0",
                             'data.partition="shards"', "data.classes_per_agent=2", "data.test_fraction=0.2",
                             f"train.agents_per_round={a.cohort}", f"train.batch_size={a.batch}"]
    return every + ["train.nu=0", 'data.dataset="mnist5k"', 'data.partition="virtual-shards"',
                    f"data.num_agents={a.large_agents}", "data.holdout_agents=0", "data.samples_per_agent=50",
                    "data.classes_per_agent=2", f"train.agents_per_round={a.large_cohort}",
                    f"train.batch_size={a.large_batch}", f"eval.agents={min(100, a.large_agents)}"]


def dp_overrides(a) -> list[str]:
    return [f"privacy.clip={a.clip}", f"privacy.noise_multiplier={a.noise_multiplier}", 'privacy.sampling="fixed"']


class DPTimer:
    """Wall seconds in ``mechanism.clip_updates`` and ``mechanism.noise`` as the round calls them
    (``federation.algorithm`` looks both up on the module at each call), summed per round by
    :meth:`close_round`; timed without the profiler."""

    def __init__(self, device):
        from mpifedmeta.privacy import mechanism
        self.mechanism, self.device = mechanism, device
        self.real = {"clip": mechanism.clip_updates, "noise": mechanism.noise}
        self.current = collections.Counter()
        self.rounds = {"clip": [], "noise": []}
        self.calls = {"clip": [], "noise": []}
        self.clip_shapes = collections.Counter()     # (rows, d) of the clipped blocks (the agent chunks)

    def _timed(self, what):
        real = self.real[what]

        def call(*args, **kw):
            common.sync(self.device)
            t0 = time.perf_counter()
            out = real(*args, **kw)
            common.sync(self.device)
            self.current[what] += time.perf_counter() - t0
            self.current[what + "_calls"] += 1
            if what == "clip":
                self.clip_shapes[tuple(args[0].shape)] += 1
            return out
        return call

    def close_round(self) -> None:
        for what in self.rounds:
            self.rounds[what].append(self.current[what])
            self.calls[what].append(self.current[what + "_calls"])
        self.current.clear()

    def __enter__(self):
        self.mechanism.clip_updates, self.mechanism.noise = self._timed("clip"), self._timed("noise")
        return self

    def __exit__(self, *exc):
        self.mechanism.clip_updates, self.mechanism.noise = self.real["clip"], self.real["noise"]


class Side:
    """One variant's rounds, one per call, from the initial model (optionally closing a DPTimer round)."""

    def __init__(self, run, timer: DPTimer | None = None):
        self.run, self.timer = run, timer
        self.w, self.r = run.w0.clone(), 0

    def __call__(self) -> None:
        self.r += 1
        self.w = self.run.step(self.w, self.r)
        if self.timer is not None:
            self.timer.close_round()


@contextlib.contextmanager
def quiet_stderr():
    """File descriptor 2 to /dev/null (the profiler's native start/stop lines); Python errors still raise."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def profiled_regions(side: Side, rounds: int) -> dict:
    """The engine's labelled regions (ms per round, CPU time incl. children) over ``rounds`` rounds."""
    if rounds <= 0:
        return {}
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(rounds):
            side()
        wall = time.perf_counter() - t0
    out = {k: 0.0 for k in REGIONS}
    for e in prof.key_averages():
        if e.key in out:
            out[e.key] += e.cpu_time_total / rounds / 1e3
    out["round_wall_ms"] = 1e3 * wall / rounds
    return out


def previous_clip(theta: torch.Tensor, w: torch.Tensor, clip: float) -> torch.Tensor:
    """``mechanism.clip_updates`` before commit f2c01df (timed for comparison, not the engine's): the update and
    its float64 copy as (B, d) temporaries, ``addcmul`` into a third, copied back."""
    delta = theta - w
    norms = torch.linalg.vector_norm(delta.to(torch.float64), dim=1)
    factor = torch.clamp(clip / torch.clamp(norms, min=1e-300), max=1.0).to(theta.dtype)
    theta.copy_(torch.addcmul(w, delta, factor.unsqueeze(1)))
    return theta


def clip_alone(shape: tuple, clip: float, repeats: int, device) -> dict:
    """``mechanism.clip_updates`` alone on one block of the round's shape (random updates, norms around the
    clip), against :func:`previous_clip` and against the norms alone (``vector_norm`` of a ready (B, d) block of
    updates, accumulated in float64 as the engine does, and in float32: what clipping would still cost if its
    factor were folded into the exact sum's per-row scale, which forms θ_i − w anyway), interleaved; ms per call
    (the block's copy subtracted) and the largest difference between the engine's and the previous results."""
    from mpifedmeta.privacy import mechanism
    g = torch.Generator().manual_seed(0)
    B, d = shape
    w = torch.randn(d, generator=g).to(device)
    block = (w + (2 * clip / d ** 0.5) * torch.randn(B, d, generator=g).to(device)).contiguous()
    work = {k: block.clone() for k in ("engine", "previous", "norms", "norms32")}
    fns = {"engine": lambda: mechanism.clip_updates(work["engine"].copy_(block), w, clip),
           "previous": lambda: previous_clip(work["previous"].copy_(block), w, clip),
           "norms": lambda: torch.linalg.vector_norm(work["norms"].copy_(block), dim=1, dtype=torch.float64),
           "norms32": lambda: torch.linalg.vector_norm(work["norms32"].copy_(block), dim=1)}
    copy = common.interleaved({"copy": lambda: work["engine"].copy_(block)}, device, repeats, 60.0)["copy"]
    t = common.interleaved(fns, device, repeats, 60.0)
    diff = float((fns["engine"]() - fns["previous"]()).abs().max())
    out = {f"{k}_ms": 1e3 * (t[k]["median_s"] - copy["median_s"]) for k in fns}
    return dict(out, shape=list(shape), copy_ms=1e3 * copy["median_s"], max_abs_diff=diff,
                repeats=t["engine"]["repeats"])


def agent_chunk(run) -> int | None:
    """The agent chunk the set-up chose (``train.agent_chunk = "auto"`` times candidates at start-up), read from
    the ``Round`` that ``common.engine_rounds`` keeps in the closure of ``step``; None when not reachable."""
    cells = dict(zip(run.step.__code__.co_freevars, run.step.__closure__ or ()))
    setup = cells["s"].cell_contents if "s" in cells else None
    return getattr(getattr(getattr(setup, "round", None), "spec", None), "agent_chunk", None)


def measure(a, name: str, device) -> dict:
    label = WORKS[name]
    off_run = common.engine_rounds(work_overrides(a, name))
    chunk = agent_chunk(off_run)      # the DP variant gets the same agent chunk (the start-up's timing may differ)
    dp_run = common.engine_rounds(work_overrides(a, name) + dp_overrides(a) +
                                  ([f"train.agent_chunk={chunk}"] if chunk is not None else []))
    timer = DPTimer(device)
    off, dp = Side(off_run), Side(dp_run, timer)
    with timer:
        for _ in range(a.warmup):
            off()
            dp()
        t = common.interleaved({"off": off, "dp": dp}, device, a.rounds, a.budget)
        n = t["dp"]["repeats"]
        clip_s, noise_s = timer.rounds["clip"][-n:], timer.rounds["noise"][-n:]
        clip_calls = timer.calls["clip"][-1]
        regions = profiled_regions(Side(dp_run, timer), a.profile_rounds)
    o, d = t["off"], t["dp"]
    pairs = [(y - x) / x for x, y in zip(o["samples_s"], d["samples_s"])]
    row = {"work": name, "label": label, "num_params": int(off_run.w0.numel()),
           "agents": off_run.cfg.data.num_agents, "cohort": off_run.cfg.train.agents_per_round,
           "strategy_off": off_run.strategy, "strategy_dp": dp_run.strategy, "rounds_timed": n,
           "off_s_per_round": o["median_s"], "dp_s_per_round": d["median_s"],
           "overhead_paired": statistics.median(pairs),
           "overhead_medians": (d["median_s"] - o["median_s"]) / o["median_s"],
           "clip_s_per_round": statistics.median(clip_s), "noise_s_per_round": statistics.median(noise_s),
           "off_timing": o, "dp_timing": d, "paired_overheads": pairs, "clip_s": clip_s, "noise_s": noise_s,
           "agent_chunk": chunk, "clip_calls_per_round": clip_calls,
           "clip_block": list(timer.clip_shapes.most_common(1)[0][0]),
           "profiled_regions_ms": regions, "setup_s": {"off": off_run.setup_s, "dp": dp_run.setup_s},
           "loadavg_after": os.getloadavg()}
    row["clip_share"] = row["clip_s_per_round"] / o["median_s"]
    row["noise_share"] = row["noise_s_per_round"] / o["median_s"]
    row["parts_share"] = row["clip_share"] + row["noise_share"]
    row["clip_alone"] = clip_alone(tuple(row["clip_block"]), a.clip, a.rounds, device)
    for k in ("engine", "previous", "norms", "norms32"):
        row["clip_alone"][f"per_round_{k}_ms"] = row["clip_alone"][f"{k}_ms"] * clip_calls
    row["accountant"] = accountant_costs(a, off_run.cfg.data.num_agents - off_run.cfg.data.holdout_agents,
                                         off_run.cfg.train.agents_per_round)
    print(f"  {label:>28}: off {1e3 * o['median_s']:.1f} ms/round, DP {1e3 * d['median_s']:.1f} ms/round, "
          f"overhead {100 * row['overhead_paired']:+.1f}% (clip {1e3 * row['clip_s_per_round']:.2f} ms, "
          f"noise {1e3 * row['noise_s_per_round']:.2f} ms)", flush=True)
    return row


def accountant_costs(a, num_train: int, m: int) -> dict:
    """Seconds per ``Ledger.advance`` (one round composed + ε) and of one calibration, per accountant."""
    from mpifedmeta.privacy import accountant
    from mpifedmeta.privacy.mechanism import PrivacySpec
    out = {}
    for sampling, kind in (("poisson", "rdp"), ("fixed", "rdp"), ("poisson", "pld")):
        spec = PrivacySpec(a.clip, a.noise_multiplier, 1.0 / num_train ** 1.1, sampling, kind, num_train, m)
        ledger, times = accountant.Ledger(spec), []
        for _ in range(a.accountant_rounds):
            t0 = time.perf_counter()
            eps = ledger.advance()
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        try:
            z = accountant.calibrate(spec, CALIBRATE_EPSILON, a.accountant_rounds)
        except Exception as e:        # noqa: BLE001 — an unreachable target is a result here, not a failure
            z = f"{type(e).__name__}: {e}"
        out[f"{kind}-{sampling}"] = {"median_s": statistics.median(times), "first_s": times[0], "last_s": times[-1],
                                     "rounds": a.accountant_rounds, "epsilon": eps, "delta": spec.delta, "q": spec.q,
                                     "calibrate_s": time.perf_counter() - t0, "calibrated_z": z}
    return out


def assess(rows: list[dict]) -> dict:
    return {f"overhead_{r['work']}": common.target(
        f"DP (clip + noise) overhead <= {100 * OVERHEAD_TARGET:g}% of the round, {r['label']} "
        f"({r['agents']} agents, {r['cohort']} per round)", r["overhead_paired"], OVERHEAD_TARGET, at_most=True,
        fmt="{:+.1%}", detail=f"{1e3 * r['dp_s_per_round']:.1f} vs {1e3 * r['off_s_per_round']:.1f} ms/round; "
                              f"clip + noise {100 * r['parts_share']:.1f}%") for r in rows}


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: 12 agents, 4 per round (virtual: 1000, 20), "
                                                         "τ = 2, 3 timed rounds, 3 accountant rounds")
    ap.add_argument("--works", nargs="+", default=list(WORKS), choices=list(WORKS))
    ap.add_argument("--agents", type=int, default=100, help="digits: agents in total (default 100)")
    ap.add_argument("--cohort", type=int, default=32, help="digits: agents per round (default 32)")
    ap.add_argument("--batch", type=int, default=32, help="digits: samples per batch (default 32)")
    ap.add_argument("--large-agents", type=int, default=100_000, help="virtual: agents in total (default 10^5)")
    ap.add_argument("--large-cohort", type=int, default=1000, help="virtual: agents per round (default 1000)")
    ap.add_argument("--large-batch", type=int, default=10, help="virtual: samples per batch (default 10)")
    ap.add_argument("--tau", type=int, default=5, help="local steps per round (default 5)")
    ap.add_argument("--hidden", type=int, nargs="+", default=[80, 60])
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--clip", type=float, default=1.0, help="privacy.clip C of the dp variant (default 1)")
    ap.add_argument("--noise-multiplier", type=float, default=1.0, help="privacy.noise_multiplier z (default 1)")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds per variant (default 20)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="rounds per variant before timing (default 2; common.interleaved adds one more)")
    ap.add_argument("--budget", type=float, default=90.0,
                    help="seconds of timed rounds per work; fewer rounds (>= 3) beyond it (default 90)")
    ap.add_argument("--profile-rounds", type=int, default=3, help="dp rounds under torch.profiler (default 3; 0: none)")
    ap.add_argument("--accountant-rounds", type=int, default=50,
                    help="rounds composed to time the accountant, and of the timed calibration (default 50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/privacy.json)")
    a = ap.parse_args(argv)
    if a.quick:
        a.agents, a.cohort, a.tau, a.rounds, a.warmup, a.profile_rounds = 12, 4, 2, 3, 1, 1
        a.large_agents, a.large_cohort, a.accountant_rounds = 1000, 20, 3
    return a


def main(argv=None) -> int:
    a = parse(argv)
    torch.set_num_threads(1)
    device = common.pick_device("cpu")
    info = common.machine_info(device)
    info["threads_choice"] = "1 torch thread for both variants (mpifedmeta: train.threads=1, 1 rank)"
    t_start = time.perf_counter()
    print(f"{common.physical_cores()} cores, load average {' '.join(f'{x:.2f}' for x in info['loadavg_start'])}; "
          f"1 torch thread; torch {info['torch_version']}; DP: clip C = {a.clip:g}, noise multiplier z = "
          f"{a.noise_multiplier:g}, fixed-size cohorts")
    rows = [measure(a, name, device) for name in a.works]
    print(f"\nMLP {'-'.join(map(str, a.hidden))} ELU, τ={a.tau}, float32, 1 thread; digits: {a.agents} agents, "
          f"{a.cohort} per round, batch {a.batch}; virtual: {a.large_agents} agents, {a.large_cohort} per round, "
          f"batch {a.large_batch}; median of {rows[0]['rounds_timed']} alternating rounds after {a.warmup + 1} "
          "warm-up rounds each; chunk = the agent chunk (auto, timed at the off run's start-up; 0 = the whole block), "
          "given to both variants; overhead = median over the pairs of (DP − off) / off; clip, noise = ms per round "
          "in mechanism.clip_updates / mechanism.noise (dp rounds), share = of the off round")
    print(common.table(rows, [
        ("label", "work", ""), ("cohort", "cohort", ""), ("num_params", "d", ""), ("agent_chunk", "chunk", ""),
        ("off_s_per_round", "off s/round", "{:.4f}"), ("dp_s_per_round", "DP s/round", "{:.4f}"),
        ("overhead_paired", "overhead", "{:+.1%}"), ("overhead_medians", "Δ medians", "{:+.1%}"),
        ("clip_s_per_round", "clip s/round", "{:.5f}"), ("noise_s_per_round", "noise s/round", "{:.5f}"),
        ("parts_share", "clip+noise share", "{:.2%}")]))
    reg = [dict(work=r["label"], **{k.split(".")[-1]: v for k, v in r["profiled_regions_ms"].items()}) for r in rows
           if r["profiled_regions_ms"]]
    if reg:
        print(f"\nprofiler (torch.profiler, {a.profile_rounds} DP rounds; ms per round, CPU time incl. children; "
              "inflated by the profiler's cost per op):")
        print(common.table(reg, [("work", "work", ""), ("round_wall_ms", "round", "{:.1f}"),
                                 ("local_update", "local_update", "{:.1f}"), ("clip", "clip", "{:.2f}"),
                                 ("exact_sum", "exact_sum", "{:.2f}"), ("allreduce", "allreduce", "{:.2f}")]))
    alone = [dict(work=r["label"], block="×".join(map(str, r["clip_block"])), calls=r["clip_calls_per_round"],
                  **r["clip_alone"]) for r in rows]
    print("\nthe clip alone (information): on one block of the round's agent chunk (random updates), interleaved, ms "
          "per call (the block's copy subtracted) and per round (× calls per round): the engine's "
          "mechanism.clip_updates; the previous one (before f2c01df: float64 copy, addcmul, copy back); the norms "
          "alone (vector_norm of a ready block accumulated in float64 as the engine does, and in float32: the floor "
          "if the factor were folded into the exact sum); max |diff| = engine vs previous")
    print(common.table(alone, [("work", "work", ""), ("block", "block", ""), ("calls", "calls/round", ""),
                               ("engine_ms", "engine ms/call", "{:.3f}"), ("previous_ms", "previous ms/call", "{:.3f}"),
                               ("norms_ms", "norms f64 ms/call", "{:.3f}"),
                               ("norms32_ms", "norms f32 ms/call", "{:.3f}"),
                               ("per_round_engine_ms", "engine ms/round", "{:.1f}"),
                               ("per_round_previous_ms", "previous ms/round", "{:.1f}"),
                               ("per_round_norms_ms", "norms f64 ms/round", "{:.1f}"),
                               ("per_round_norms32_ms", "norms f32 ms/round", "{:.1f}"),
                               ("max_abs_diff", "max |diff|", "{:.1e}")]))
    acc = [dict(work=r["label"], kind=k, **v, ms=1e3 * v["median_s"], first_ms=1e3 * v["first_s"],
                last_ms=1e3 * v["last_s"], z=v["calibrated_z"] if isinstance(v["calibrated_z"], float) else None)
           for r in rows for k, v in r["accountant"].items()]
    print(f"\naccountant on rank 0 after each round (not in train/round_time; information): ms per round composed "
          f"(Ledger.advance), median / first / last of {a.accountant_rounds} rounds at z = {a.noise_multiplier:g}; "
          f"calibrate = start-up seconds of privacy.target_epsilon = {CALIBRATE_EPSILON:g} for "
          f"{a.accountant_rounds} rounds")
    print(common.table(acc, [("work", "work", ""), ("kind", "accountant-sampling", ""), ("q", "q", "{:.4g}"),
                             ("delta", "δ", "{:.2g}"), ("ms", "ms/round", "{:.1f}"), ("first_ms", "first", "{:.1f}"),
                             ("last_ms", "last", "{:.1f}"), ("epsilon", "ε after", "{:.3g}"),
                             ("calibrate_s", "calibrate s", "{:.2f}"), ("z", "z for ε=8", "{:.3f}")]))
    targets = assess(rows)
    print()
    common.print_targets(targets, a.quick)
    settings = {k: v for k, v in vars(a).items() if k != "out"}
    common.finish("privacy", a.out, info, t_start, {"quick": a.quick, "settings": settings, "rows": rows,
                                                    "targets": targets})
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Seconds per round of every built-in algorithm: mpifedmeta against a per-agent loop written the
way PFLlib writes it, on peers.py's work, side by side in one process (1 thread), interleaved.

The work (the default, peers.py's): the scikit-learn digits (8×8) partitioned over 100 agents as
mpifedmeta partitions them (``shards``, 2 classes per agent, 20% test split; both sides get this very
partition from ``mpifedmeta.data``), MLP 64-80-60-10 with ELU (mpifedmeta's ``mlp``, hidden [80, 60];
the loop's module is loaded with the engine's initial model), 32 agents per round, τ = 5, batches of
32 drawn with replacement from the agent's training split, α = β = 0.05, float32, CPU, 1 torch thread.

The algorithms (mpifedmeta/algorithms/*.py; the loop does the same math, the gradient evaluations per
agent and round in brackets):

  fedavg        meta, ν = 0: τ SGD steps of size β; the server averages                         [τ]
  perfedavg-fo  meta, ν = 1 fo (first-order Per-FedAvg): per step θ = w − α∇f(w; D),
                w ← w − β∇f(θ; D′)                                                              [2τ]
  pfedme        λ = 15, K = 5, η_p = 0.01: per step K steps θ ← θ − η_p(∇f(θ; D_t) + λ(θ − w_i)),
                then w_i ← w_i − βλ(w_i − θ); upload w_i                                        [Kτ]
  ditto         λ = 0.1, s = τ, lr_p = β: τ SGD steps of the global part; s steps of the stored
                personal model v ← v − lr_p(∇f(v) + λ(v − w))                                   [τ + s]
  fedrep        head = the last layer, head steps = τ, head lr = β: head steps with the body
                frozen, then τ body steps with the head frozen; the server averages the body    [2τ]

The two sides:

  mpifedmeta    whole rounds in this process through ``common.engine_rounds`` (set up exactly as
                ``mpifedmeta run`` sets a run up, 1 rank, ``train.threads=1``, the default strategy):
                cohort, batched local update, exact sums, server step;
  loop          PFLlib's structure (TsingZ0/PFLlib, system/flcore): one client object per agent that
                holds its own resident ``copy.deepcopy(model)`` (``nn.Module``), ``torch.optim.SGD``
                steps with ``loss.backward()``, a Python loop over the cohort; the server copies the
                global parameters into each selected client and averages the uploaded modules
                parameter by parameter. pFedMe's inner problem and Ditto's personal objective add
                their proximal term in the optimizer step as PFLlib does (its ``pFedMeOptimizer``
                with μ = 0 and ``PerturbedGradientDescent``, in place); FedRep freezes the body or
                the head by ``requires_grad`` (PFLlib's clientrep). The clients of the loop draw
                their batches with ``torch.randint`` (PFLlib iterates DataLoaders; this is the same
                number of samples per step, cheaper than a DataLoader); the cohorts are mpifedmeta's
                (``mpifedmeta.core.rng.cohort``), so both sides train the same agents every round.

Measured per algorithm: the median seconds per round of each side, timed alternately (round of one,
round of the other, ...) after ``--warmup`` rounds each (plus the one warm-up round of
``common.interleaved``), and the speed-up loop / mpifedmeta. Two sanity columns (not tests):

  same batches  in the ``--warmup`` rounds the loop's clients draw the engine's own batches
                (``mpifedmeta.core.rng.batch_indices``, in the order each algorithm uses its slots):
                the relative difference of the two global models after them (float32 rounding
                when both do the same math); the timed rounds use the loop's own ``torch.randint``;
  loss          the mean training loss of the last 10 rounds of each side (mpifedmeta's
                ``train_loss``; the loop's mean over the cohort of each agent's mean loss over its
                τ steps — the losses the algorithms report: the outer batch for Per-FedAvg, pFedMe's
                first inner step of each local step, Ditto's global part, FedRep's body steps); the
                random batches differ after the warm-up, the curves should not.

Target (printed and in the JSON): mpifedmeta >= 3× the per-agent loop per round, for each algorithm.

    python benchmarks/algorithms.py                       # the default work (about 1-2 minutes on 2 cores)
    python benchmarks/algorithms.py --algorithms pfedme ditto --rounds 40
    python benchmarks/algorithms.py --quick               # tiny smoke run (seconds)
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import common
import torch
from torch import nn

import peers

SPEEDUP_TARGET = 3.0            # per round, mpifedmeta over the per-agent loop, each algorithm
LOSS_ROUNDS = 10                # rounds of the sanity loss column

#: name → (label, gradient evaluations per agent and round as a function of the settings)
ALGORITHMS = {
    "fedavg": ("meta ν=0 (FedAvg)", lambda a: a.tau),
    "perfedavg-fo": ("meta ν=1 fo (Per-FedAvg)", lambda a: 2 * a.tau),
    "pfedme": ("pfedme", lambda a: a.inner_steps * a.tau),
    "ditto": ("ditto", lambda a: 2 * a.tau),
    "fedrep": ("fedrep", lambda a: 2 * a.tau),
}


def engine_overrides(a, name: str) -> list[str]:
    """The ``--set``-style overrides of the work and of algorithm ``name`` (its keys given explicitly,
    the same values the loop uses)."""
    common_ = ['data.dataset="digits"', f"data.num_agents={a.agents}", "data.holdout_agents=0",
               "data.partition=\"shards\"", "data.classes_per_agent=2", "data.test_fraction=0.2",
               "model.name=\"mlp\"", f"model.hidden={list(a.hidden)}", f"train.agents_per_round={a.cohort}",
               f"train.local_steps={a.tau}", f"train.batch_size={a.batch}", f"train.alpha={a.alpha}",
               f"train.beta={a.beta}", f"train.seed={a.seed}", "train.dtype=\"float32\"", "train.device=\"cpu\"",
               "train.threads=1", "train.weighting=\"uniform\"", "server.optimizer=\"sgd\"", "server.lr=1.0",
               "eval.every=1000000"]
    algo = {
        "fedavg": ['algorithm.name="meta"', "train.nu=0"],
        "perfedavg-fo": ['algorithm.name="meta"', "train.nu=1", 'train.metagrad="fo"'],
        "pfedme": ['algorithm.name="pfedme"', f"algorithm.lam={a.pfedme_lam}", f"algorithm.inner_steps={a.inner_steps}",
                   f"algorithm.inner_lr={a.inner_lr}"],
        "ditto": ['algorithm.name="ditto"', f"algorithm.lam={a.ditto_lam}", f"algorithm.personal_steps={a.tau}",
                  f"algorithm.personal_lr={a.beta}"],
        "fedrep": ['algorithm.name="fedrep"', f"algorithm.head_steps={a.tau}", f"algorithm.head_lr={a.beta}"],
    }[name]
    return common_ + algo


# --------------------------------------------------------------------------- mpifedmeta's side
def engine_round_object(run):
    """The engine's ``Round`` behind ``run.step`` (common.engine_rounds keeps the set-up in the
    closure of ``step``), whose ``run(w, r)`` also returns the round's training loss; None when
    engine_rounds no longer holds it there (then the losses are nan and there is no agreement check)."""
    cells = dict(zip(run.step.__code__.co_freevars, run.step.__closure__ or ()))
    setup = cells["s"].cell_contents if "s" in cells else None
    rnd = getattr(setup, "round", None)
    return rnd if callable(getattr(rnd, "run", None)) else None


class EngineSide:
    """mpifedmeta's rounds, one per call, from the initial model; the training loss of each round."""

    def __init__(self, run):
        self.run, self.round = run, engine_round_object(run)
        self.w, self.r, self.losses = run.w0.clone(), 0, []

    def __call__(self) -> None:
        self.r += 1
        if self.round is not None:
            res = self.round.run(self.w, self.r)          # what run.step does, plus the loss
            if res.w is None:
                raise RuntimeError(f"mpifedmeta: round {self.r} diverged")
            self.w = res.w
            self.losses.append(res.train_loss)
        else:
            self.w = self.run.step(self.w, self.r)
            self.losses.append(float("nan"))


# --------------------------------------------------------------------------- the per-agent loop (PFLlib's way)
class PFedMeOptimizer(torch.optim.Optimizer):
    """PFLlib's pFedMeOptimizer (μ = 0), in place: θ ← θ − lr·(∇f(θ) + λ·(θ − w_i))."""

    def __init__(self, params, lr: float, lam: float):
        super().__init__(params, dict(lr=lr, lam=lam))

    @torch.no_grad()
    def step(self, local_params):
        for group in self.param_groups:
            for p, w in zip(group["params"], local_params):
                p.add_(p.grad + group["lam"] * (p - w), alpha=-group["lr"])


class PerturbedGradientDescent(torch.optim.Optimizer):
    """PFLlib's PerturbedGradientDescent (Ditto's personal step): v ← v − lr·(∇f(v) + μ·(v − w))."""

    def __init__(self, params, lr: float, mu: float):
        super().__init__(params, dict(lr=lr, mu=mu))

    @torch.no_grad()
    def step(self, global_params):
        for group in self.param_groups:
            for p, g in zip(group["params"], global_params):
                p.add_(p.grad + group["mu"] * (p - g), alpha=-group["lr"])


class BaseHeadSplit(nn.Module):
    """PFLlib's FedRep model: ``base`` (the body) and ``head`` (the last layer)."""

    def __init__(self, net: nn.Sequential):
        super().__init__()
        self.base, self.head = nn.Sequential(*list(net)[:-1]), net[-1]

    def forward(self, x):
        return self.head(self.base(x))


class Client:
    """One agent: its training data and its own resident model (``copy.deepcopy`` of the global one)."""

    def __init__(self, cid: int, X, Y, model: nn.Module, a, gen: torch.Generator):
        self.id, self.X, self.Y, self.a, self.gen = cid, X, Y, a, gen
        self.model = copy.deepcopy(model)
        self.loss = nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=a.beta)

    positions = None        # (steps, slots, b): the engine's batches of this round (the agreement check)

    def next_batch(self):
        if self.positions is not None:
            t, s = BATCH_ORDER[type(self)](self.calls, self.a)
            self.calls += 1
            i = self.positions[t, s]
        else:
            i = torch.randint(0, len(self.Y), (self.a.batch,), generator=self.gen)
        return self.X[i], self.Y[i]

    def shared(self, model: nn.Module):
        return model.parameters()

    @torch.no_grad()
    def set_parameters(self, global_model: nn.Module) -> None:
        for new, old in zip(self.shared(global_model), self.shared(self.model)):
            old.copy_(new)

    def sgd_steps(self, model, optimizer, steps: int, losses: list | None = None) -> None:
        for _ in range(steps):
            x, y = self.next_batch()
            optimizer.zero_grad()
            loss = self.loss(model(x), y)
            loss.backward()
            optimizer.step()
            if losses is not None:
                losses.append(loss.detach())

    def train(self) -> torch.Tensor:
        """FedAvg: τ SGD steps; the mean loss of the steps."""
        losses = []
        self.sgd_steps(self.model, self.optimizer, self.a.tau, losses)
        return torch.stack(losses).mean()


class PerFedAvgClient(Client):
    """First-order Per-FedAvg (PFLlib's clientperavg with the temporary copy restored before the β step)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.inner = torch.optim.SGD(self.model.parameters(), lr=self.a.alpha)

    def train(self) -> torch.Tensor:
        losses = []
        for _ in range(self.a.tau):
            temp = [p.detach().clone() for p in self.model.parameters()]
            x, y = self.next_batch()                  # step 1: θ = w − α∇f(w; D)
            self.inner.zero_grad()
            self.loss(self.model(x), y).backward()
            self.inner.step()
            x, y = self.next_batch()                  # step 2: ∇f(θ; D′), applied to w
            self.optimizer.zero_grad()
            loss = self.loss(self.model(x), y)
            loss.backward()
            with torch.no_grad():
                for p, t in zip(self.model.parameters(), temp):
                    p.copy_(t)
            self.optimizer.step()
            losses.append(loss.detach())
        return torch.stack(losses).mean()


class PFedMeClient(Client):
    """pFedMe (PFLlib's clientpFedMe): the module is θ, ``local_params`` are w_i; uploads w_i."""

    def __init__(self, *args):
        super().__init__(*args)
        self.local_params = [p.detach().clone() for p in self.model.parameters()]
        self.optimizer = PFedMeOptimizer(self.model.parameters(), lr=self.a.inner_lr, lam=self.a.pfedme_lam)

    @torch.no_grad()
    def set_parameters(self, global_model: nn.Module) -> None:
        for new, old, local in zip(global_model.parameters(), self.model.parameters(), self.local_params):
            old.copy_(new)
            local.copy_(new)

    def train(self) -> torch.Tensor:
        a, losses = self.a, []
        for _ in range(a.tau):
            x, y = self.next_batch()
            for k in range(a.inner_steps):
                self.optimizer.zero_grad()
                loss = self.loss(self.model(x), y)
                loss.backward()
                self.optimizer.step(self.local_params)
                if k == 0:
                    losses.append(loss.detach())
            with torch.no_grad():                     # w_i ← w_i − βλ(w_i − θ)
                for theta, local in zip(self.model.parameters(), self.local_params):
                    local.add_(local - theta, alpha=-a.beta * a.pfedme_lam)
        with torch.no_grad():                         # PFLlib's update_parameters(model, local_params)
            for p, local in zip(self.model.parameters(), self.local_params):
                p.copy_(local)
        return torch.stack(losses).mean()


class DittoClient(Client):
    """Ditto (PFLlib's clientditto): ``pmodel`` the personal model, kept between rounds (the global
    model of the agent's first round, as mpifedmeta), trained first (``ptrain``) against the received
    global model; then τ SGD steps of ``model``."""

    def __init__(self, *args):
        super().__init__(*args)
        self.pmodel, self.poptimizer = None, None

    def train(self) -> torch.Tensor:
        if self.pmodel is None:
            self.pmodel = copy.deepcopy(self.model)
            self.poptimizer = PerturbedGradientDescent(self.pmodel.parameters(), lr=self.a.beta, mu=self.a.ditto_lam)
        for _ in range(self.a.tau):                   # ptrain: s = τ personal steps, anchored at the global model
            x, y = self.next_batch()
            self.poptimizer.zero_grad()
            self.loss(self.pmodel(x), y).backward()
            self.poptimizer.step(self.model.parameters())
        return super().train()


class FedRepClient(Client):
    """FedRep (PFLlib's clientrep): the head is the client's own, the body is received and uploaded."""

    def __init__(self, *args):
        super().__init__(*args)
        self.optimizer = torch.optim.SGD(self.model.base.parameters(), lr=self.a.beta)
        self.poptimizer = torch.optim.SGD(self.model.head.parameters(), lr=self.a.beta)

    def shared(self, model: nn.Module):
        return model.base.parameters()

    def train(self) -> torch.Tensor:
        for p in self.model.base.parameters():
            p.requires_grad = False
        for p in self.model.head.parameters():
            p.requires_grad = True
        self.sgd_steps(self.model, self.poptimizer, self.a.tau)
        for p in self.model.base.parameters():
            p.requires_grad = True
        for p in self.model.head.parameters():
            p.requires_grad = False
        losses = []
        self.sgd_steps(self.model, self.optimizer, self.a.tau, losses)
        return torch.stack(losses).mean()


CLIENTS = {"fedavg": Client, "perfedavg-fo": PerFedAvgClient, "pfedme": PFedMeClient, "ditto": DittoClient,
           "fedrep": FedRepClient}
#: the k-th batch a client draws in a round → (local step, slot) of the engine's batches (algorithms/*.py)
BATCH_ORDER = {
    Client: lambda k, a: (k, 0),
    PerFedAvgClient: lambda k, a: (k // 2, k % 2),                                # slot 0 inner, slot 1 outer
    PFedMeClient: lambda k, a: (k, 0),                                            # one batch per local step
    DittoClient: lambda k, a: (k, 1) if k < a.tau else (k - a.tau, 0),           # personal first (ptrain)
    FedRepClient: lambda k, a: (k, 0) if k < a.tau else (k - a.tau, 1),          # head steps, then body steps
}


class LoopSide:
    """PFLlib's server: resident clients, the cohort's local training one client after the other,
    the uniform average of the uploaded (shared) parameters, parameter by parameter."""

    def __init__(self, name: str, a, run, data):
        from mpifedmeta.core import rng
        self.cohort_of = lambda r: rng.cohort(a.seed, r, a.agents, a.cohort)
        net = peers.mlp({"hidden": a.hidden})
        net.load_state_dict({k.removeprefix("net."): v for k, v in run.layout.split(run.w0.clone()).items()})
        self.global_model = BaseHeadSplit(net) if name == "fedrep" else net
        torch.manual_seed(a.seed)
        gen = torch.Generator().manual_seed(a.seed)
        self.clients = [CLIENTS[name](i, X, Y, self.global_model, a, gen) for i, (X, Y) in enumerate(data)]
        self.counts = torch.tensor([len(Y) for _, Y in data])
        self.r, self.losses, self.a = 0, [], a
        self.engine_batches = None        # (steps, slots): draw the engine's batches (the agreement check)

    def __call__(self) -> None:
        self.r += 1
        ids = self.cohort_of(self.r)
        selected = [self.clients[i] for i in ids]
        if self.engine_batches:
            from mpifedmeta.core import rng
            t = torch.as_tensor(ids)
            pos = rng.batch_indices(self.a.seed, self.r, t, self.counts[t], *self.engine_batches, self.a.batch)
        losses = []
        for j, c in enumerate(selected):
            c.positions, c.calls = (pos[j], 0) if self.engine_batches else (None, 0)
            c.set_parameters(self.global_model)
            losses.append(c.train())
        shared = selected[0].shared
        with torch.no_grad():                         # PFLlib's aggregate_parameters (uniform weights)
            for p in shared(self.global_model):
                p.zero_()
            w = 1.0 / len(selected)
            for c in selected:
                for s, p in zip(shared(self.global_model), shared(c.model)):
                    s.add_(p, alpha=w)
        self.losses.append(float(torch.stack(losses).mean()))

    def flat(self) -> torch.Tensor:
        """The global model as mpifedmeta's flat layout (the same parameter order)."""
        return torch.cat([p.detach().reshape(-1) for p in self.global_model.parameters()])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- measuring
def measure(a, name: str, data) -> dict:
    label, grads = ALGORITHMS[name]
    run = common.engine_rounds(engine_overrides(a, name))
    engine, loop = EngineSide(run), LoopSide(name, a, run, data)
    algo = engine.round.spec.algorithm if engine.round is not None else None
    loop.engine_batches = (algo.steps, algo.slots) if algo is not None else None
    for _ in range(a.warmup):          # warm-up rounds = the agreement check: the loop on the engine's batches
        engine()
        loop()
    agree = {"rounds": a.warmup, "rel_err_w": rel_err(loop.flat(), engine.w),
             "max_abs_loss_diff": max(abs(x - y) for x, y in zip(engine.losses, loop.losses))} \
        if loop.engine_batches and a.warmup else {"why": "no warm-up rounds" if not a.warmup else
                                                  "the engine's Round is not reachable from engine_rounds"}
    loop.engine_batches = None
    t = common.interleaved({"mpifedmeta": engine, "loop": loop}, torch.device("cpu"), a.rounds, a.budget)
    e, lp = t["mpifedmeta"], t["loop"]
    n = min(LOSS_ROUNDS, len(engine.losses))
    row = {"algorithm": name, "label": label, "grads_per_agent": grads(a), "strategy": run.strategy,
           "setup_s": run.setup_s, "rounds_timed": e["repeats"], "rounds_run": engine.r,
           "engine_s_per_round": e["median_s"], "loop_s_per_round": lp["median_s"],
           "speedup": lp["median_s"] / e["median_s"], "engine_timing": e, "loop_timing": lp,
           "engine_loss": statistics.fmean(engine.losses[-n:]), "loop_loss": statistics.fmean(loop.losses[-n:]),
           "loss_rounds": n, "agreement": agree, "engine_loss_per_round": engine.losses,
           "loop_loss_per_round": loop.losses, "loadavg_after": os.getloadavg()}
    print(f"  {label:>24}: mpifedmeta {1e3 * row['engine_s_per_round']:.1f} ms/round, loop "
          f"{1e3 * row['loop_s_per_round']:.1f} ms/round, {row['speedup']:.2f}×", flush=True)
    return row


def assess(rows: list[dict]) -> dict:
    return {f"vs_loop_{r['algorithm']}": common.target(
        f"per round >= {SPEEDUP_TARGET:g}x the per-agent loop, {r['label']} (1 rank x 1 thread vs 1 thread)",
        r["speedup"], SPEEDUP_TARGET, fmt="{:.2f}×",
        detail=f"{1e3 * r['engine_s_per_round']:.1f} vs {1e3 * r['loop_s_per_round']:.1f} ms/round") for r in rows}


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: 12 agents, 4 per round, τ = 2, K = 2, "
                                                         "3 timed rounds after 1 warm-up round")
    ap.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    ap.add_argument("--agents", type=int, default=100, help="agents in total (default 100)")
    ap.add_argument("--cohort", type=int, default=32, help="agents per round (default 32)")
    ap.add_argument("--tau", type=int, default=5, help="local steps per round (default 5)")
    ap.add_argument("--batch", type=int, default=32, help="samples per batch, drawn with replacement (default 32)")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds per side and algorithm (default 20)")
    ap.add_argument("--warmup", type=int, default=3,
                    help="rounds per side before timing (default 3; common.interleaved adds one more)")
    ap.add_argument("--budget", type=float, default=60.0,
                    help="seconds of timed rounds per algorithm; fewer rounds (>= 3) beyond it (default 60)")
    ap.add_argument("--hidden", type=int, nargs="+", default=[80, 60])
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--pfedme-lam", type=float, default=15.0, help="pFedMe's λ (default 15, the engine's default)")
    ap.add_argument("--inner-steps", type=int, default=5, help="pFedMe's K (default 5)")
    ap.add_argument("--inner-lr", type=float, default=0.01, help="pFedMe's η_p (default 0.01)")
    ap.add_argument("--ditto-lam", type=float, default=0.1, help="Ditto's λ (default 0.1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/algorithms.json)")
    a = ap.parse_args(argv)
    if a.quick:
        a.agents, a.cohort, a.tau, a.rounds, a.warmup, a.inner_steps = 12, 4, 2, 3, 1, 2
    return a


def main(argv=None) -> int:
    a = parse(argv)
    torch.set_num_threads(1)
    info = common.machine_info(common.pick_device("cpu"))
    info["threads_choice"] = "1 torch thread for both sides (mpifedmeta: train.threads=1, 1 rank)"
    t_start = time.perf_counter()
    print(f"{common.physical_cores()} cores, load average {' '.join(f'{x:.2f}' for x in info['loadavg_start'])}; "
          f"1 torch thread; torch {info['torch_version']}")
    data = peers.agent_data({"agents": a.agents, "seed": a.seed})
    rows = [measure(a, name, data) for name in a.algorithms]
    warm = a.warmup + 1
    print(f"\ndigits, MLP 64-{'-'.join(map(str, a.hidden))}-10 ELU, {a.agents} agents, {a.cohort} per round, "
          f"τ={a.tau}, batch {a.batch}, float32, 1 thread; median of {rows[0]['rounds_timed']} alternating rounds "
          f"after {warm} warm-up rounds each; speed-up = loop / mpifedmeta; loss = mean training loss of the last "
          f"{rows[0]['loss_rounds']} rounds (sanity, not a test)")
    disp = [dict(r, engine_ms=1e3 * r["engine_s_per_round"], loop_ms=1e3 * r["loop_s_per_round"],
                 agree=r["agreement"].get("rel_err_w")) for r in rows]
    print(common.table(disp, [("label", "algorithm", ""), ("grads_per_agent", "grads/agent", ""),
                              ("engine_ms", "mpifedmeta ms/round", "{:.1f}"), ("loop_ms", "loop ms/round", "{:.1f}"),
                              ("speedup", "speed-up", "{:.2f}×"), ("engine_loss", "loss mpifedmeta", "{:.3f}"),
                              ("loop_loss", "loss loop", "{:.3f}"), ("agree", "same batches: w rel err", "{:.1e}"),
                              ("strategy", "strategy", "")]))
    print(f"same batches: the relative difference of the two global models after the {a.warmup} warm-up rounds, "
          "in which the loop draws the engine's batches (mpifedmeta.core.rng.batch_indices)")
    targets = assess(rows)
    print()
    common.print_targets(targets, a.quick)
    settings = {k: v for k, v in vars(a).items() if k != "out"}
    common.finish("algorithms", a.out, info, t_start, {"quick": a.quick, "settings": settings, "rows": rows,
                                                       "targets": targets})
    return 0


if __name__ == "__main__":
    sys.exit(main())

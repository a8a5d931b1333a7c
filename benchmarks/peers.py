#!/usr/bin/env python
"""The same federated work in three systems, side by side: mpifedmeta, pfl-research and a plain
per-agent autograd loop. Seconds per round, start-up time and peak memory, each system using the
whole machine.

The work (the default): the scikit-learn digits (8×8), partitioned over 100
agents exactly as mpifedmeta does (``shards``, 2 classes per agent, 20% test split; every system
gets the same partition from ``mpifedmeta.data``), MLP 64-80-60-10 with ELU, 32 agents per
round, τ = 5 local steps, batches of 32 drawn with replacement from the agent's training split,
float32, on the CPU (also where a GPU is present: this compares simulators on the machine's
cores). Two algorithms:

  ν = 0     FedAvg: τ local SGD steps of size β, then the server averages the local models;
  ν = 1 fo  first-order Per-FedAvg: each local step is θ = w − α∇f(w; D), w ← w − β∇f(θ; D′).

The systems, each launched as its own command so that start-up and memory are its own:

  mpifedmeta 2×1   ``mpiexec -n 2 mpifedmeta run CONFIG --set train.threads=1``: 2 ranks, 1 thread each;
  mpifedmeta 1×T   ``mpifedmeta run CONFIG --set train.threads=T``: 1 rank, T torch threads (T = free cores);
  pfl 2×1          pfl-research 0.6 (``pip install -e '.[peers]'``) under ``torchrun
                   --nproc_per_node 2`` (its PyTorch simulation: each worker trains half the cohort
                   on one resident model and the statistics are summed with torch.distributed/gloo).
                   pfl has no Per-FedAvg: ν = 0 and ν = 1 fo are one small custom algorithm here
                   (a ``FederatedAveraging`` whose ``train_one_user`` runs the τ steps above on
                   pfl's resident ``PyTorchModel``; the server side — cohort sampling, workers,
                   aggregation, central SGD step with learning rate 1 = the average — is pfl's);
  loop 1×T         a plain loop over the cohort in one process with T threads: one resident
                   ``nn.Module`` loaded with the global weights per agent, ``torch.autograd.grad``.

Measured per run:

  s/round     median over the rounds after ``--warmup`` (mpifedmeta: ``train/round_time`` of
              metrics.h5, rank 0; pfl and the loop: the same interval on worker 0's clock);
  start-up    seconds from launching the command to the start of round 1 (mpifedmeta: its
              start-up line, printed just before round 1; pfl: its ``on_train_begin`` callback;
              the loop: after its set-up), and to the end of round 1;
  peak RSS    largest resident set of any process of the run (``wait4`` of the launcher, which
              covers every descendant), plus each worker's own where it reports it;
  loss        mean outer-batch loss of the cohorts of the last 10 rounds: the three learn the same thing
              (their random streams for cohorts and batches differ, their initial model is the same).

Plus the start-up: ``mpifedmeta run configs/quickstart.toml --set train.rounds=1`` from launch to
the start (and end) of round 1, median of ``--startup-runs`` launches.

Target (printed and in the JSON): per round, mpifedmeta 2×1 >= 6× pfl 2×1, for ν = 0 and ν = 1 fo.

    python benchmarks/peers.py                     # the default work (about 2-3 minutes on 2 cores)
    python benchmarks/peers.py --agents 1000 --cohort 128 --rounds 20
    python benchmarks/peers.py --quick             # tiny smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

RESULT_TAG = "PEERS_RESULT "
SPEEDUP_TARGET = 6.0       # per round, mpifedmeta-2x1 over pfl-2x1
P = 2                      # processes of the 2×1 columns: mpifedmeta ranks, pfl workers
ALGOS = {0: ("FedAvg", 0, "exact"), 1: ("Per-FedAvg fo", 1, "fo")}


# --------------------------------------------------------------------------- the shared problem
def agent_data(spec: dict):
    """Per-agent training tensors (X_i, Y_i) of the partition mpifedmeta builds for this spec."""
    import torch
    from mpifedmeta.data import load_dataset, make_partition
    ds = load_dataset("digits")
    part = make_partition(ds, "shards", spec["agents"], classes_per_agent=2, test_fraction=0.2, seed=spec["seed"])
    X, Y = torch.as_tensor(ds.x).flatten(1), torch.as_tensor(ds.y)
    out = []
    for a in range(part.num_agents):
        rows = torch.as_tensor(part.train_idx[part.train_ptr[a]:part.train_ptr[a + 1]])
        out.append((X[rows].contiguous(), Y[rows].contiguous()))
    return out


def mlp(spec: dict):
    """64-80-60-10 with ELU (the widths of spec["hidden"]), as mpifedmeta's ``mlp``."""
    from torch import nn
    layers, width = [], 64
    for h in spec["hidden"]:
        layers += [nn.Linear(width, h), nn.ELU()]
        width = h
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def local_steps(net, params, X, Y, spec: dict, gen) -> float:
    """τ local steps of ν-step first-order Per-FedAvg (ν = 0: plain SGD) on the resident ``net``,
    whose ``params`` hold the agent's weights; returns the mean loss of the outer batches."""
    import torch
    import torch.nn.functional as F
    n, b, nu, alpha, beta = len(Y), spec["batch"], spec["nu"], spec["alpha"], spec["beta"]
    total = 0.0
    for _ in range(spec["tau"]):
        start = [p.detach().clone() for p in params] if nu else None
        for _ in range(nu):                                     # fine-tuning steps θ ← θ − α∇f(θ; D_l)
            i = torch.randint(0, n, (b,), generator=gen)
            g = torch.autograd.grad(F.cross_entropy(net(X[i]), Y[i]), params)
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.sub_(alpha * gi)
        i = torch.randint(0, n, (b,), generator=gen)
        loss = F.cross_entropy(net(X[i]), Y[i])
        g = torch.autograd.grad(loss, params)                   # ∇f(θ^ν; D′)
        with torch.no_grad():
            for j, (p, gi) in enumerate(zip(params, g)):
                (p.copy_(start[j]) if nu else p).sub_(beta * gi)
        total += float(loss.detach())
    return total / spec["tau"]


def report(payload: dict) -> None:
    import resource
    payload["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(RESULT_TAG + json.dumps(payload), flush=True)


# --------------------------------------------------------------------------- workers
def worker_loop(spec: dict) -> None:
    """The plain per-agent autograd loop (one process)."""
    import numpy as np
    import torch
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    data = agent_data(spec)
    net = mlp(spec)
    params = list(net.parameters())
    glob = [p.detach().clone() for p in params]
    rng, gen = np.random.default_rng(spec["seed"]), torch.Generator().manual_seed(spec["seed"])
    t_begin = time.time()
    times, loss = [], []
    for _ in range(spec["rounds"]):
        t0 = time.perf_counter()
        acc = [torch.zeros_like(p) for p in glob]
        losses = []
        for a in rng.choice(len(data), spec["cohort"], replace=False):
            with torch.no_grad():
                for p, w in zip(params, glob):
                    p.copy_(w)
            losses.append(local_steps(net, params, *data[a], spec, gen))
            with torch.no_grad():
                for s, p in zip(acc, params):
                    s.add_(p)
        glob = [s / spec["cohort"] for s in acc]
        loss.append(sum(losses) / len(losses))
        times.append(time.perf_counter() - t0)
    report({"rank": 0, "t_train_begin": t_begin, "round_times": times, "loss": loss})


def worker_pfl(spec: dict) -> None:
    """pfl-research's simulation with a ν-step first-order Per-FedAvg local update (ν = 0: FedAvg)."""
    import torch
    torch.set_num_threads(spec["threads"])
    import torch.nn.functional as F
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.internal.ops.selector import get_default_framework_module
    from pfl.metrics import Metrics, StringMetricName, Weighted
    from pfl.model.pytorch import PyTorchModel

    rank = get_default_framework_module().distributed.global_rank
    torch.manual_seed(spec["seed"])
    data = agent_data(spec)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp(spec)

        def forward(self, x):
            return self.net(x)

        def loss(self, x, y, eval=False):          # noqa: A002 - pfl's signature
            return F.cross_entropy(self(x), y)

        def metrics(self, x, y, eval=False):       # noqa: A002
            with torch.no_grad():
                return {"loss": Weighted(float(F.cross_entropy(self(x), y, reduction="sum")), len(y))}

    gen = torch.Generator().manual_seed(spec["seed"] + rank)

    class FirstOrderPerFedAvg(FederatedAveraging):
        """FedAvg whose local training is τ steps of ν-step first-order Per-FedAvg."""

        def train_one_user(self, initial_model_state, model, user_dataset, central_context):
            X, Y = user_dataset.raw_data
            params = list(model.variable_map.values())
            loss = local_steps(model.pytorch_model, params, X, Y, spec, gen)
            return model.get_model_difference(initial_model_state), Metrics(
                [(StringMetricName("outer loss"), Weighted(loss, 1))])

    class Clock(TrainingProcessCallback):
        def __init__(self):
            self.begin, self.ticks, self.loss = None, [], []

        def on_train_begin(self, *, model):
            self.begin = time.time()
            self.ticks.append(time.perf_counter())
            return Metrics()

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            self.ticks.append(time.perf_counter())
            loss = float("nan")
            for name, value in aggregate_metrics:
                if "outer loss" in str(name):
                    loss = float(value.overall_value if hasattr(value, "overall_value") else value)
            self.loss.append(loss)
            return False, Metrics()

    users = {a: Dataset((X, Y), user_id=a) for a, (X, Y) in enumerate(data)}
    fed = FederatedDataset(lambda a: users[a], get_user_sampler("minimize_reuse", list(range(len(data)))))
    net = Net()
    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    backend = SimulatedBackend(training_data=fed, val_data=None)
    algo_params = NNAlgorithmParams(central_num_iterations=spec["rounds"], evaluation_frequency=10 ** 9,
                                    train_cohort_size=spec["cohort"], val_cohort_size=None)
    train_params = NNTrainHyperParams(local_num_epochs=1, local_learning_rate=spec["beta"], local_batch_size=None)
    clock = Clock()
    FirstOrderPerFedAvg().run(algorithm_params=algo_params, backend=backend, model=model,
                              model_train_params=train_params,
                              model_eval_params=NNEvalHyperParams(local_batch_size=None), callbacks=[clock])
    times = [b - a for a, b in zip(clock.ticks, clock.ticks[1:])]
    report({"rank": rank, "t_train_begin": clock.begin, "round_times": times, "loss": clock.loss})


# --------------------------------------------------------------------------- launching and measuring
def launch(cmd: list[str], env: dict, timeout: float, cwd: str | None = None) -> dict:
    """Run ``cmd``; every output line with its arrival time (time.time()), the exit code, the wall
    time, and the peak RSS of the largest process among it and its descendants (wait4)."""
    t_launch = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                            start_new_session=True, bufsize=1)
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    lines = []
    for line in proc.stdout:
        lines.append((time.time(), line.rstrip("\n")))
    _, status, ru = os.wait4(proc.pid, 0)
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"cmd": shlex.join(cmd), "t_launch": t_launch, "wall_s": time.perf_counter() - t0, "lines": lines,
            "exit_code": proc.returncode, "peak_rss_mib": ru.ru_maxrss / 1024.0,
            "timed_out": proc.returncode == -signal.SIGKILL}


def tail(run: dict, n: int = 3) -> str:
    return " | ".join(t for _, t in run["lines"][-n:])


def worker_results(run: dict) -> list[dict]:
    """The workers' result lines (two processes may write into one output line: decode just the JSON)."""
    found = []
    for _, text in run["lines"]:
        at = text.find(RESULT_TAG)
        if at >= 0:
            found.append(json.JSONDecoder().raw_decode(text[at + len(RESULT_TAG):])[0])
    return sorted(found, key=lambda r: r["rank"])


def last_rounds_loss(row: dict, n: int = 10) -> None:
    """Mean outer-batch loss of the last ``n`` rounds: the systems' random streams differ, so single
    rounds do not match, but the training curves must."""
    series = row.get("loss_per_round") or []
    if series:
        row["loss"] = statistics.fmean(series[-n:])


def summarize(times: list[float], warmup: int) -> dict:
    kept = times[warmup:] if len(times) > warmup else times[-1:]
    return {"s_per_round": statistics.median(kept), "round_times_s": times, "rounds_counted": len(kept)}


def write_config(path: str, a, nu: int, method: str, out_dir: str) -> None:
    text = f"""# generated by benchmarks/peers.py
[data]
dataset = "digits"
num_agents = {a.agents}
partition = "shards"
classes_per_agent = 2
test_fraction = 0.2

[model]
name = "mlp"
hidden = {list(a.hidden)}

[train]
rounds = {a.rounds}
agents_per_round = {a.cohort}
local_steps = {a.tau}
nu = {nu}
metagrad = "{method}"
batch_size = {a.batch}
alpha = {a.alpha}
beta = {a.beta}
seed = {a.seed}

[eval]
every = 1000000
agents = 1
finetune_steps = [0]

[output]
dir = "{out_dir}"
checkpoint_every = 1000000
progress_every = 1000000
"""
    with open(path, "w") as f:
        f.write(text)


def startup_line_time(run: dict) -> float | None:
    """Arrival time of mpifedmeta's start-up line (printed on rank 0 just before round 1)."""
    for t, text in run["lines"]:
        if text.startswith("mpifedmeta ") and "rank(s)" in text:
            return t
    return None


def run_mpifedmeta(a, nu: int, method: str, ranks: int, threads: int, workdir: str, tag: str) -> dict:
    import common
    out = os.path.join(workdir, f"{tag}_nu{nu}")
    shutil.rmtree(out, ignore_errors=True)
    cfg = os.path.join(workdir, f"{tag}_nu{nu}.toml")
    write_config(cfg, a, nu, method, out)
    sets = [f"train.threads={threads}", "train.device=cpu"] + list(a.set)
    cmd = common.mpifedmeta_cmd() + ["run", cfg] + sum((["--set", s] for s in sets), [])
    if ranks > 1:
        cmd = shlex.split(a.launcher.format(P=ranks)) + cmd
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.pop("MPIFEDMETA_INJECT_FAILURE", None)
    run = launch(cmd, env, a.timeout)
    row = {"processes": ranks, "threads": threads, "cmd": run["cmd"], "wall_s": run["wall_s"],
           "peak_rss_mib": run["peak_rss_mib"], "exit_code": run["exit_code"]}
    if run["exit_code"] != 0:
        row["error"] = f"exit {run['exit_code']}: {tail(run)}"
        return row
    metrics = common.read_run(out)
    row.update(summarize([float(x) for x in metrics.train["round_time"]], a.warmup))
    row["loss_per_round"] = [float(x) for x in metrics.train["train_loss"]]
    row["strategy"] = str(metrics.attrs.get("strategy", "?"))
    t_line = startup_line_time(run)
    if t_line is not None:
        row["startup_s"] = t_line - run["t_launch"]
        row["first_round_done_s"] = row["startup_s"] + row["round_times_s"][0]
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def run_worker(a, kind: str, nu: int, processes: int, threads: int) -> dict:
    spec = {"agents": a.agents, "cohort": a.cohort, "tau": a.tau, "batch": a.batch, "nu": nu, "alpha": a.alpha,
            "beta": a.beta, "rounds": a.rounds, "seed": a.seed, "hidden": list(a.hidden), "threads": threads}
    me = [os.path.abspath(__file__), "--worker", kind, "--spec", json.dumps(spec)]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] + me
    else:
        cmd = [sys.executable] + me
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1", PFL_PYTORCH_DEVICE="cpu")
    run = launch(cmd, env, a.timeout)
    row = {"processes": processes, "threads": threads, "cmd": run["cmd"], "wall_s": run["wall_s"],
           "peak_rss_mib": run["peak_rss_mib"], "exit_code": run["exit_code"]}
    res = worker_results(run)
    if run["exit_code"] != 0 or not res:
        row["error"] = f"exit {run['exit_code']}: {tail(run)}"
        return row
    r0 = res[0]
    row.update(summarize(r0["round_times"], a.warmup))
    row["loss_per_round"] = r0["loss"]
    row["worker_peak_rss_mib"] = [r["maxrss_mib"] for r in res]
    row["startup_s"] = min(r["t_train_begin"] for r in res) - run["t_launch"]
    row["first_round_done_s"] = row["startup_s"] + row["round_times_s"][0]
    return row


def pfl_version() -> str | None:
    import importlib.metadata as md
    try:
        return md.version("pfl")
    except md.PackageNotFoundError:
        return None


def pfl_missing() -> str | None:
    """Why pfl cannot run here (one line), or None."""
    version = pfl_version()
    if version is None:
        return "pfl is not installed (pip install -e '.[peers]')"
    r = subprocess.run([sys.executable, "-c", "import pfl.model.pytorch, pfl.aggregate.simulate"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
        return f"pfl {version} does not import: {last[0]}"
    return None


def startup_benchmark(a, workdir: str) -> dict:
    """`mpifedmeta run configs/quickstart.toml --set train.rounds=1`: launch -> round 1, median of runs."""
    import common
    runs = []
    for i in range(a.startup_runs):
        out = os.path.join(workdir, f"quickstart_{i}")
        shutil.rmtree(out, ignore_errors=True)
        cmd = common.mpifedmeta_cmd() + ["run", os.path.join(REPO, "configs", "quickstart.toml"),
                                         "--set", "train.rounds=1", "--set", f'output.dir="{out}"']
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("MPIFEDMETA_INJECT_FAILURE", None)
        run = launch(cmd, env, a.timeout)
        r = {"cmd": run["cmd"], "wall_s": run["wall_s"], "exit_code": run["exit_code"], "loadavg": os.getloadavg()}
        t_line = startup_line_time(run)
        if run["exit_code"] != 0 or t_line is None:
            r["error"] = f"exit {run['exit_code']}: {tail(run)}"
        else:
            r["to_round1_start_s"] = t_line - run["t_launch"]
            r["to_round1_end_s"] = r["to_round1_start_s"] + float(common.read_run(out).train["round_time"][0])
        shutil.rmtree(out, ignore_errors=True)
        runs.append(r)
    ok = [r for r in runs if "error" not in r]
    res = {"runs": runs, "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS")}
    if ok:
        res["to_round1_start_s"] = statistics.median(r["to_round1_start_s"] for r in ok)
        res["to_round1_end_s"] = statistics.median(r["to_round1_end_s"] for r in ok)
        res["process_wall_s"] = statistics.median(r["wall_s"] for r in ok)
    return res


# --------------------------------------------------------------------------- main
SYSTEMS = ("mpifedmeta-2x1", "mpifedmeta-1xT", "pfl-2x1", "loop-1xT")


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: ν = 1 fo only, 12 agents, 4 per round, "
                                                         "τ=2, 4 rounds, at most 1 start-up run")
    ap.add_argument("--agents", type=int, default=100, help="agents in total (default 100)")
    ap.add_argument("--cohort", type=int, default=32, help="agents per round (default 32)")
    ap.add_argument("--tau", type=int, default=5, help="local steps per round (default 5)")
    ap.add_argument("--batch", type=int, default=32, help="samples per batch, drawn with replacement (default 32)")
    ap.add_argument("--rounds", type=int, default=30, help="rounds per run (default 30)")
    ap.add_argument("--warmup", type=int, default=3, help="first rounds not counted (default 3)")
    ap.add_argument("--nus", type=int, nargs="+", default=[0, 1], choices=sorted(ALGOS),
                    help="0 = FedAvg, 1 = first-order Per-FedAvg (default both)")
    ap.add_argument("--hidden", type=int, nargs="+", default=[80, 60])
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--threads", default="auto",
                    help='T of the 1-process columns: N, or "auto" (default) = the cores not kept busy by other '
                         "processes (multi-threaded torch collapses when oversubscribed)")
    ap.add_argument("--trials", type=int, default=1,
                    help="runs per column, alternating between the systems; the fastest is reported (default 1)")
    ap.add_argument("--startup-runs", type=int, default=3, help="launches of the quickstart start-up check (0 = skip)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="extra --set for the mpifedmeta runs, e.g. train.strategy=vmap (repeatable)")
    ap.add_argument("--launcher", default=None, help='MPI launch command with {P} (default "mpiexec -n {P}")')
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per launched run")
    ap.add_argument("--keep", action="store_true", help="keep the mpifedmeta output directories")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/peers.json)")
    ap.add_argument("--worker", choices=("loop", "pfl"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        a.agents, a.cohort, a.tau, a.rounds, a.warmup, a.startup_runs = 12, 4, 2, 4, 1, min(a.startup_runs, 1)
        a.nus = [1]
    return a


def run_system(a, system: str, nu: int, T: int, workdir: str) -> dict:
    """One run of ``system`` on algorithm ``nu``: mpifedmeta on P = 2 ranks × 1 thread or 1 rank × T
    threads, pfl on 2 workers × 1 thread, the loop on 1 process × T threads."""
    name, nu_, method = ALGOS[nu]
    if system == "mpifedmeta-2x1":
        r = run_mpifedmeta(a, nu_, method, P, 1, workdir, "mpi2")
    elif system == "mpifedmeta-1xT":
        r = run_mpifedmeta(a, nu_, method, 1, T, workdir, "mpi1")
    elif system == "pfl-2x1":
        r = run_worker(a, "pfl", nu_, P, 1)
    else:
        r = run_worker(a, "loop", nu_, 1, T)
    r.update(system=system, nu=nu, algorithm=name, loadavg_after=os.getloadavg())
    last_rounds_loss(r)
    msg = (f"ERROR {r['error']}" if "error" in r else
           f"{1e3 * r['s_per_round']:.1f} ms/round, start-up {r.get('startup_s', float('nan')):.2f} s, "
           f"peak RSS {r['peak_rss_mib']:.0f} MiB")
    print(f"  {system:>15} {name:>14}: {msg}", flush=True)
    return r


def best_rows(trials: dict, nus: list[int]) -> list[dict]:
    """The fastest trial of every (system, ν), with every other system's s/round over its own."""
    rows = []
    for (system, nu), rs in trials.items():
        ok = [r for r in rs if "error" not in r]
        best = dict(min(ok, key=lambda r: r["s_per_round"]) if ok else rs[-1])
        best["trials_s_per_round"] = [r.get("s_per_round") for r in rs]
        rows.append(best)
    for nu in nus:
        ref = {r["system"]: r for r in rows if r["nu"] == nu and "error" not in r}
        for r in rows:
            if r["nu"] == nu and "error" not in r:
                for other in ("pfl-2x1", "loop-1xT"):
                    if other in ref:
                        r[f"vs_{other}"] = ref[other]["s_per_round"] / r["s_per_round"]
    return rows


def assess(rows: list[dict], nus: list[int], notes: dict) -> dict:
    """Per round, mpifedmeta on 2 ranks × 1 thread against pfl-research on 2 workers × 1 thread."""
    import common
    targets = {}
    for nu in nus:
        mine = next((r for r in rows if r["nu"] == nu and r["system"] == "mpifedmeta-2x1"), {})
        why = None if "vs_pfl-2x1" in mine else notes.get("pfl-2x1", mine.get("error", "no mpifedmeta-2x1/pfl-2x1 pair"))
        pfl = next((r for r in rows if r["nu"] == nu and r["system"] == "pfl-2x1" and "s_per_round" in r), None)
        detail = (f"{1e3 * mine['s_per_round']:.1f} vs {1e3 * pfl['s_per_round']:.1f} ms/round"
                  if why is None else None)
        targets[f"vs_pfl_nu{nu}"] = common.target(
            f"per round >= {SPEEDUP_TARGET}x pfl-research, {ALGOS[nu][0]} (mpifedmeta-2x1 vs pfl-2x1)",
            mine.get("vs_pfl-2x1"), SPEEDUP_TARGET, fmt="{:.2f}×", why=why, detail=detail)
    return targets


def print_results(a, rows: list[dict], notes: dict, startup: dict | None) -> None:
    import common
    cols = [("algorithm", "algorithm", ""), ("system", "system", ""), ("processes", "proc", ""), ("threads", "thr", ""),
            ("s_per_round", "ms/round", "{:.1f}"), ("vs_pfl-2x1", "× pfl", "{:.2f}"), ("vs_loop-1xT", "× loop", "{:.2f}"),
            ("startup_s", "start-up s", "{:.2f}"), ("first_round_done_s", "round 1 done s", "{:.2f}"),
            ("peak_rss_mib", "peak RSS MiB", "{:.0f}"), ("loss", "loss (last 10)", "{:.3f}"), ("strategy", "strategy", "")]
    disp = [dict(r, s_per_round=r["s_per_round"] * 1e3 if "s_per_round" in r else None) for r in rows]
    print(f"\ndigits, MLP 64-{'-'.join(map(str, a.hidden))}-10 ELU, {a.agents} agents, {a.cohort} per round, τ={a.tau}, "
          f"batch {a.batch}, float32; median over rounds {a.warmup + 1}..{a.rounds}; × = that system's s/round / this one's")
    print(common.table(disp, cols))
    for s, why in notes.items():
        print(f"  {s}: {why}")
    if startup and "to_round1_start_s" in startup:
        print(f"\nstart-up, `mpifedmeta run configs/quickstart.toml --set train.rounds=1` (median of "
              f"{len([r for r in startup['runs'] if 'error' not in r])}): launch -> round 1 starts "
              f"{startup['to_round1_start_s']:.2f} s, ends {startup['to_round1_end_s']:.2f} s, process exits "
              f"{startup['process_wall_s']:.2f} s")
    elif startup:
        print(f"\nstart-up check failed: {startup['runs'][-1].get('error')}")


def main(argv=None) -> int:
    a = parse(argv)
    if a.worker:
        (worker_loop if a.worker == "loop" else worker_pfl)(json.loads(a.spec))
        return 0
    import common
    a.launcher = a.launcher or common.default_launcher()
    info = common.machine_info(common.pick_device("cpu"))
    cores, T = common.physical_cores(), common.free_cores() if a.threads == "auto" else max(1, int(a.threads))
    info["cores"] = cores
    info["threads_choice"] = f"T = {T}: " + ("--threads" if a.threads != "auto" else
                                             f"{T} of {cores} cores free (load average {info['loadavg_start'][0]:.1f})")
    info["pfl_version"] = pfl_version()
    print(f"{cores} cores, load average {' '.join(f'{x:.2f}' for x in info['loadavg_start'])}; {info['threads_choice']}; "
          f"torch {info['torch_version']}, pfl {info['pfl_version']}")
    systems, notes = list(a.systems), {}
    why = pfl_missing() if "pfl-2x1" in systems else None
    if why:
        print(f"pfl column skipped: {why}")
        notes["pfl-2x1"] = why
        systems.remove("pfl-2x1")

    workdir = tempfile.mkdtemp(prefix="mpifedmeta-peers-")
    t_start = time.perf_counter()
    trials: dict = {}
    for t in range(max(1, a.trials)):
        for nu in a.nus:
            for system in (systems if t % 2 == 0 else systems[::-1]):
                trials.setdefault((system, nu), []).append(run_system(a, system, nu, T, workdir))
    rows = best_rows(trials, a.nus)
    startup = startup_benchmark(a, workdir) if a.startup_runs > 0 else None
    print_results(a, rows, notes, startup)
    targets = assess(rows, a.nus, notes)
    print()
    common.print_targets(targets, a.quick)
    shutil.rmtree(workdir, ignore_errors=True)
    settings = {k: v for k, v in vars(a).items() if k not in ("out", "worker", "spec")} | {"T": T, "P": P}
    common.finish("peers", a.out, info, t_start, {"quick": a.quick, "notes": notes, "settings": settings,
                                                  "rows": rows, "startup": startup, "targets": targets})
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

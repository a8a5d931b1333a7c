"""Shared scaffolding of the benchmark scripts: device choice, timing, machine description, synthetic
federated problems (MNIST-shaped random data), the engine driven in-process, launch commands, JSON
output, plain-text tables and the one ending every benchmark has (:func:`finish`).

Nothing here hard-codes a result: every number the scripts print or write is measured when they run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from typing import Callable, NamedTuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
if REPO not in sys.path:          # run from a checkout without installing the package
    sys.path.insert(0, REPO)

from mpifedmeta.core import metagrad, reference  # noqa: E402
from mpifedmeta.engine import backends, compiled as compiled_rounds  # noqa: E402
from mpifedmeta.models import build_model, param_dict  # noqa: E402
from mpifedmeta.parallel import devices  # noqa: E402

# Every script measures under the allocator setting `mpifedmeta run` uses (the baselines in the same process too).
HOST_ALLOCATOR = devices.tune_host_allocator(os.environ)
IN_SHAPE = (1, 28, 28)       # MNIST-like images
NUM_CLASSES = 10


# --------------------------------------------------------------------------- device, threads and timing
def pick_device(name: str = "auto") -> torch.device:
    """'auto' = the first CUDA GPU when torch sees one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no usable GPU")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def physical_cores() -> int:
    """CPUs this process may run on, ignoring OMP_NUM_THREADS (which `nproc` would obey)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def free_cores() -> int:
    """The cores not kept busy by other processes (1-minute load average), at least 1."""
    cores = physical_cores()
    return max(1, min(cores, int(cores - os.getloadavg()[0] + 0.5)))


def choose_threads(arg: str, device: torch.device) -> dict:
    """Set torch's CPU threads: an integer, or "auto" = every core unless other processes keep
    them busy (1-minute load average), then the cores left free (at least 1).

    Multi-threaded torch collapses on an oversubscribed machine (every parallel region waits for a
    descheduled thread; busy_node.py measures it), which would make every timing meaningless;
    "auto" avoids it and the JSON records why.
    """
    if device.type == "cuda":
        return {"threads": torch.get_num_threads(), "reason": "GPU run: CPU threads left at torch's default"}
    if arg != "auto":
        n = int(arg)
        if n > 0:
            torch.set_num_threads(n)
        return {"threads": torch.get_num_threads(), "reason": "--threads" if n > 0 else "torch default"}
    cores, free, load1 = physical_cores(), free_cores(), os.getloadavg()[0]
    torch.set_num_threads(free)
    why = (f"all {cores} cores (load average {load1:.1f})" if free == cores else
           f"{free} of {cores} cores: load average {load1:.1f} from other processes (multi-threaded torch "
           f"collapses when oversubscribed); pass --threads {cores} to force")
    return {"threads": free, "reason": why}


def interleaved(fns: dict, device, repeats: int, budget_s: float) -> dict:
    """Warm up every variant once, then time them in turn (A, B, C, A, B, C, ...) so that a noisy
    machine slows them alike; fewer repeats (>= 3) when the warm-up shows more than ``budget_s``.
    Returns per variant the median/min/max seconds, the CPU seconds and every sample."""
    warm = {}
    for name, fn in fns.items():
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        warm[name] = time.perf_counter() - t0
    per_round = sum(warm.values())
    n = repeats if per_round * repeats <= budget_s else max(3, min(repeats, int(budget_s / max(per_round, 1e-9))))
    samples = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: {"median_s": statistics.median(s), "min_s": min(s), "max_s": max(s), "repeats": n,
                   "cpu_s_median": statistics.median(cpu[name]), "warmup_s": warm[name], "samples_s": s}
            for name, s in samples.items()}


# --------------------------------------------------------------------------- machine description
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty", "--abbrev=7"],
                             capture_output=True, text=True, timeout=10)      # "-dirty": uncommitted changes
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device) -> dict:
    """Everything needed to judge a number: versions, device, cores, threads, date, command, and the
    load average now (the start of the run; :func:`finish` adds the one at its end)."""
    import mpifedmeta
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_version": str(torch.__version__),
        "mpifedmeta_version": mpifedmeta.__version__,
        "git_commit": _git_commit(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": physical_cores(),
        "torch_threads": torch.get_num_threads(),
        "host_allocator": HOST_ALLOCATOR,
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "command": " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv and sys.argv[0] else "?"] + sys.argv[1:]),
        "loadavg_start": os.getloadavg(),
    }
    if device.type == "cuda":
        info["cuda_version"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------- launching runs
def default_launcher() -> str:
    """The MPI launch command with {P}: the venv's mpiexec (mpich wheel), else the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return (shlex.quote(here) if os.path.exists(here) else "mpiexec") + " -n {P}"


def mpifedmeta_cmd() -> list[str]:
    """The command that starts `mpifedmeta` (the venv's entry point, else python -m)."""
    exe = os.path.join(os.path.dirname(sys.executable), "mpifedmeta")
    return [exe] if os.path.exists(exe) else [sys.executable, "-m", "mpifedmeta"]


def read_run(out_dir: str):
    """A finished run's metrics.h5: ``.train`` {column: array} and ``.attrs`` (strategy, num_params, ...)."""
    from mpifedmeta.storage import metrics
    return metrics.read(out_dir)


# --------------------------------------------------------------------------- synthetic problems
class Problem:
    """A block of B agents with MNIST-shaped random data and the stacked global model.

    ``X``/``Y``: the block's samples (``samples_per_agent`` per agent, agent a owns rows
    a·S … a·S+S−1); ``idx``/``mask``: (B, [τ,] slots, batch) sample indices as the engine uses them;
    ``params``: {name: (B, *shape)} every agent's copy of the global model.
    """

    def __init__(self, model_name: str, B: int, nu: int, method: str, batch: int = 32, device="cpu",
                 dtype=torch.float32, samples_per_agent: int = 128, local_steps: int | None = None,
                 seed: int = 0, hidden=None):
        g = torch.Generator().manual_seed(seed)
        self.model_name, self.B, self.nu, self.method, self.batch = model_name, B, nu, method, batch
        self.device, self.dtype = torch.device(device), dtype
        torch.manual_seed(seed)
        self.model = build_model(model_name, IN_SHAPE, NUM_CLASSES, hidden).to(dtype)
        self.model.requires_grad_(False)
        self.loss = reference.make_loss(self.model)
        S = samples_per_agent
        self.X = torch.rand((B * S,) + IN_SHAPE, generator=g).to(device=device, dtype=dtype)
        self.Y = torch.randint(0, NUM_CLASSES, (B * S,), generator=g).to(device)
        slots = metagrad.num_slots(nu, method)
        shape = (B, slots, batch) if local_steps is None else (B, local_steps, slots, batch)
        offsets = (torch.arange(B) * S).view((B,) + (1,) * (len(shape) - 1))
        self.idx = (offsets + torch.randint(0, S, shape, generator=g)).to(device)
        self.mask = torch.ones(shape, dtype=dtype, device=device)
        w = {k: v.to(device) for k, v in param_dict(self.model).items()}
        self.params = {k: v.unsqueeze(0).expand((B,) + v.shape).clone() for k, v in w.items()}
        self.num_params = sum(v.numel() for v in w.values())


def flat_stacked(params: dict) -> torch.Tensor:
    lead = next(iter(params.values())).shape[0]
    return torch.cat([p.reshape(lead, -1) for p in params.values()], dim=1)


def rel_err(a: dict, b: dict) -> float:
    fa, fb = flat_stacked(a).double(), flat_stacked(b).double()
    return float((fa - fb).norm() / fb.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- the engine's backends
def engine_strategies() -> tuple[str, ...]:
    """The engine's backends by name (``train.strategy`` without ``auto``)."""
    return tuple(backends.BACKENDS)


def default_strategy() -> str:
    """The engine's default ``train.strategy`` (what a run uses when the config does not say)."""
    from mpifedmeta.run import config
    return config.SCHEMA["train"]["strategy"].default


def engine_block(p: Problem, strategy: str, chunk: int = 16, alpha: float = 0.01, delta: float = 1e-3,
                 recompute: bool = False, unrolled: bool = False):
    """A no-argument callable: one ``block_meta_gradients`` call of the engine on ``p`` with backend
    ``strategy`` (or, ``unrolled``, the reference that differentiates through the unrolled inner
    loop), returning ({name: (B, ...) gradient}, losses)."""
    if unrolled:
        return lambda: reference.block_meta_gradients_unrolled(p.loss, p.params, p.X, p.Y, p.idx, p.mask, p.nu, alpha)
    be = backends.make(p.model, strategy, chunk)
    meta = metagrad.MetaSpec(p.nu, alpha, p.method, delta, recompute)
    theta = [p.params[n] for n in be.layout.names]

    def call():
        g, value = metagrad.block_meta_gradients(be, theta, p.X, p.Y, p.idx, p.mask, meta)
        return dict(zip(be.layout.names, g)), value
    return call


def engine_local_update(p: Problem, strategy: str, chunk: int = 16, alpha: float = 0.01, beta: float = 0.001,
                        delta: float = 1e-3, compiled: bool = False):
    """A no-argument callable: one ``local_update`` (τ chained meta-steps, ``p.idx`` (B, τ, slots, b))
    from the block's starting models (copied first, as the engine copies the global model into
    each chunk), returning ({name: final local models}, losses)."""
    be = backends.make(p.model, strategy, chunk)
    meta = metagrad.MetaSpec(p.nu, alpha, p.method, delta)
    start = be.layout.flatten(p.params, 1)
    mode = "compile" if compiled else "off"

    def call():
        theta, losses = compiled_rounds.local_update(mode, be, start.clone(), p.X, p.Y, p.idx, p.mask, meta, beta)
        return be.layout.split(theta), losses
    return call


def engine_auto(p: Problem, device, chunk: int = 16, alpha: float = 0.01, delta: float = 1e-3) -> dict:
    """The backend ``train.strategy = "auto"`` picks for this block: the engine's own timing rule
    (strategy.measure) over its candidates, each timed on one block call."""
    from mpifedmeta.engine import strategy as strat
    cands = [c for c in strat.CANDIDATES if c != "stacked" or backends.has_stacked_form(p.model)]
    fns = {}

    def step(cand, ch):
        if (cand, ch) not in fns:
            fns[cand, ch] = engine_block(p, cand, ch, alpha, delta)
        fns[cand, ch]()

    t0 = time.perf_counter()
    choice = strat.measure(step, device, chunk, p.B, candidates=cands)
    return {"strategy": choice.strategy, "chunk": choice.chunk, "candidates": cands,
            "seconds": dict(choice.seconds), "selection_s": time.perf_counter() - t0}


# --------------------------------------------------------------------------- whole rounds in-process
class Rounds(NamedTuple):
    """A run set up in this process, as `mpifedmeta run` sets it up, without file output.

    ``step(w, r)``: round r from the flat global model w (d,), the new w (RuntimeError if it diverged);
    ``evaluate(w, r)``: the personalized evaluation of round r (the metrics row on rank 0)."""
    step: Callable
    w0: torch.Tensor
    layout: object                # mpifedmeta.core.layout.ParamLayout
    cfg: object                   # mpifedmeta.run.config.Config
    evaluate: Callable
    strategy: str                 # the strategy description of the start-up line
    setup_s: float                # seconds of the set-up (population, block, model, initial model, backend and agent chunk)
    strategy_s: float             # part of setup_s spent choosing the strategy (not measured apart: 0)


def engine_rounds(overrides: list[str], world=None) -> Rounds:
    """The engine's rounds for the config ``overrides`` (SECTION.KEY=VALUE), on ``world`` (default:
    this process alone). The ONE place the benchmarks drive the engine's round API."""
    from mpifedmeta.parallel import dist
    from mpifedmeta.run import config, session
    if world is None:
        from mpi4py import MPI
        world = dist.World(MPI.COMM_SELF, 0, 1, 0, 1)
    if not any(o.startswith("output.dir=") for o in overrides):
        overrides = overrides + ['output.dir="/nonexistent/never-written"']
    cfg = config.load(None, overrides)
    t0 = time.perf_counter()
    s = session.setup(cfg, world)          # strategy and agent chunk chosen (timed for "auto") inside
    t1 = time.perf_counter()

    def step(w, r):
        new = s.round.run(w, r).w
        if new is None:
            raise RuntimeError(f"round {r} diverged (non-finite or out-of-range local models)")
        return new

    return Rounds(step, s.w0, s.layout, cfg, s.round.evaluate, s.strategy_line, t1 - t0, 0.0)


# --------------------------------------------------------------------------- output
def write_json(path: str, payload: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=_jsonable)
        f.write("\n")
    os.replace(tmp, path)
    return path


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """Plain-text table; ``cols`` = (key, header, format) with format like '{:.1f}'."""
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        line = []
        for k, _, fmt in cols:
            v = r.get(k)
            line.append("–" if v is None else (fmt.format(v) if fmt else str(v)))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    out = ["  ".join(c.rjust(w) for c, w in zip(cells[0], widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells[1:]]
    return "\n".join(out)


def out_path(arg: str | None, name: str) -> str:
    return arg if arg else os.path.join(RESULTS, f"{name}.json")


def target(text: str, measured: float | None, limit: float, at_most: bool = False, fmt: str = "{:.2f}",
           **extra) -> dict:
    """A target as the JSON records it: what, the measured figure (None: not measured, ``why`` may
    say why), the limit, met, how to print the figure (``fmt``) and what it is made of (``detail``)."""
    met = None if measured is None else bool(measured <= limit if at_most else measured >= limit)
    return {"target": text, "measured": measured, "limit": limit, "at_most": at_most, "met": met, "fmt": fmt, **extra}


def verdict(t: dict) -> str:
    return "not measured" if t["met"] is None else ("MET" if t["met"] else "MISSED")


def print_targets(targets: dict, quick: bool = False) -> None:
    """One line per target; a --quick run's are only a smoke test (tiny sizes, not the target's work)."""
    for t in targets.values():
        figure = "–" if t["measured"] is None else t["fmt"].format(t["measured"])
        figure += f" ({t['detail']})" if t.get("detail") else ""
        print(f"target: {t['target']}: {figure} -> {verdict(t)}" + (f" ({t['why']})" if t.get("why") else "")
              + (" [--quick: not the target's work]" if quick else ""))


def finish(name: str, out: str | None, info: dict, t_start: float, payload: dict) -> str:
    """The end of every benchmark: the load average at the end, the JSON (``out`` or
    results/<name>.json) with the machine description and the wall time, one closing line."""
    info["loadavg_end"] = os.getloadavg()
    wall = time.perf_counter() - t_start
    path = write_json(out_path(out, name), {"benchmark": name, "machine": info, **payload, "wall_s": wall})
    print(f"load average at start {info['loadavg_start'][0]:.2f}, at end {info['loadavg_end'][0]:.2f}")
    print(f"\nwrote {path} ({wall:.0f} s)")
    return path

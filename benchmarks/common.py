"""Shared helpers of the benchmark scripts: device choice, timing, machine description, synthetic
federated problems (MNIST-shaped random data), JSON output and plain-text tables.

Nothing here hard-codes a result: every number the scripts print or write is measured when they run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
if REPO not in sys.path:          # run from a checkout without installing the package
    sys.path.insert(0, REPO)

from mpifedmeta.core import metagrad, reference  # noqa: E402
from mpifedmeta.parallel import devices
from mpifedmeta.models import build_model, param_dict  # noqa: E402

# Every script measures under the allocator setting `mpifedmeta run` uses (the baselines in the same process too).
HOST_ALLOCATOR = devices.tune_host_allocator(os.environ)
IN_SHAPE = (1, 28, 28)       # MNIST-like images
NUM_CLASSES = 10


# --------------------------------------------------------------------------- device and timing
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


def time_call(fn, device: torch.device, warmup: int = 1, repeats: int = 5, budget_s: float | None = None) -> dict:
    """Run ``fn`` ``warmup`` times, then time ``repeats`` calls (synchronising a GPU around each).

    With ``budget_s``, fewer repeats (at least 3) are made when the warm-up shows that ``repeats``
    calls would take longer than the budget. Returns median/min/max seconds and all samples.
    """
    t_warm = None
    for _ in range(max(warmup, 0)):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        t_warm = time.perf_counter() - t0
    n = repeats
    if budget_s is not None and t_warm is not None and t_warm * repeats > budget_s:
        n = max(3, int(budget_s / max(t_warm, 1e-9)))
        n = min(n, repeats)
    samples = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "repeats": n, "warmup": warmup, "samples_s": samples}


def choose_threads(arg: str, device: torch.device) -> dict:
    """Set torch's CPU threads: an integer, or "auto" = every core unless other processes keep
    them busy (1-minute load average), then the cores left free (at least 1).

    Multi-threaded torch collapses on an oversubscribed machine (every parallel region waits for a
    descheduled thread: 10-100x slower, measured on the shared 2-core machine of benchmarks/README.md),
    which would make every timing meaningless; "auto" avoids it and the JSON records why.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device.type == "cuda":
        return {"threads": torch.get_num_threads(), "reason": "GPU run: CPU threads left at torch's default"}
    if arg != "auto":
        n = int(arg)
        if n > 0:
            torch.set_num_threads(n)
        return {"threads": torch.get_num_threads(), "reason": "--threads" if n > 0 else "torch default"}
    free = max(1, min(cores, int(cores - load1 + 0.5)))
    torch.set_num_threads(free)
    why = (f"all {cores} cores (load average {load1:.1f})" if free == cores else
           f"{free} of {cores} cores: load average {load1:.1f} from other processes (multi-threaded torch "
           f"collapses when oversubscribed); pass --threads {cores} to force")
    return {"threads": free, "reason": why}


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
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device) -> dict:
    """Everything needed to judge a number: versions, device, cores, threads, date, command."""
    import mpifedmeta
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_version": str(torch.__version__),
        "mpifedmeta_version": getattr(mpifedmeta, "__version__", "?"),
        "git_commit": _git_commit(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "host_allocator": HOST_ALLOCATOR,
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "command": " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv and sys.argv[0] else "?"] + sys.argv[1:]),
    }
    if device.type == "cuda":
        info["cuda_version"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------- synthetic problems
class Problem:
    """A block of B agents with MNIST-shaped random data and the stacked global model.

    ``X``/``Y``: the block's samples (``samples_per_agent`` per agent, agent a owns rows
    a·S … a·S+S−1); ``idx``/``mask``: (B, [τ,] slots, batch) sample indices as the engine uses them.
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
        self.global_params = w
        self.params = {k: v.unsqueeze(0).expand((B,) + v.shape).clone() for k, v in w.items()}
        self.num_params = sum(v.numel() for v in w.values())


def flat_stacked(params: dict) -> torch.Tensor:
    lead = next(iter(params.values())).shape[0]
    return torch.cat([p.reshape(lead, -1) for p in params.values()], dim=1)


def rel_err(a: dict, b: dict) -> float:
    fa, fb = flat_stacked(a).double(), flat_stacked(b).double()
    return float((fa - fb).norm() / fb.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------- the engine's backends
class Unavailable(Exception):
    """This engine cannot run the requested variant (the message says why, one line)."""


def engine_strategies() -> tuple[str, ...]:
    """The engine's backends by name (``train.strategy`` without ``auto``)."""
    return tuple(metagrad.STRATEGIES)


def _backend(p: "Problem", strategy: str, chunk: int):
    from mpifedmeta.engine import backends
    if strategy not in engine_strategies():
        raise Unavailable(f"this engine has no strategy {strategy!r} (it has {', '.join(engine_strategies())})")
    try:
        return backends.make(p.model, strategy, chunk)
    except ValueError as e:
        raise Unavailable(str(e).splitlines()[0]) from None


def engine_block(p: "Problem", strategy: str, chunk: int = 16, alpha: float = 0.01, delta: float = 1e-3,
                 recompute: bool = False, unrolled: bool = False):
    """A no-argument callable: one ``block_meta_gradients`` call of the engine on ``p`` with backend
    ``strategy``, returning ({name: (B, ...) gradient}, losses). Raises Unavailable if it cannot run."""
    if unrolled:
        return lambda: reference.block_meta_gradients_unrolled(p.loss, p.params, p.X, p.Y, p.idx, p.mask, p.nu, alpha)
    be = _backend(p, strategy, chunk)
    meta = metagrad.MetaSpec(p.nu, alpha, p.method, delta, recompute)
    theta = [p.params[n] for n in be.layout.names]

    def call():
        g, value = metagrad.block_meta_gradients(be, theta, p.X, p.Y, p.idx, p.mask, meta)
        return dict(zip(be.layout.names, g)), value
    return call


def engine_local_update(p: "Problem", strategy: str, chunk: int = 16, alpha: float = 0.01, beta: float = 0.001,
                        delta: float = 1e-3, compiled: bool = False):
    """A no-argument callable: one ``local_update`` (τ chained meta-steps, ``p.idx`` (B, τ, slots, b))
    from the block's starting models (copied first, as the engine copies the global model into
    each chunk), returning ({name: final local models}, losses)."""
    be = _backend(p, strategy, chunk)
    meta = metagrad.MetaSpec(p.nu, alpha, p.method, delta)
    start = be.layout.flatten(p.params, 1)
    capture = "compile" if compiled else "off"

    def call():
        theta, losses = metagrad.local_update(be, start.clone(), p.X, p.Y, p.idx, p.mask, meta, beta, capture)
        return be.layout.split(theta), losses
    return call


def engine_auto(p: "Problem", device, chunk: int = 16, alpha: float = 0.01, delta: float = 1e-3) -> dict:
    """The backend the engine's ``train.strategy = "auto"`` picks for this block (its own timing rule)."""
    import inspect
    import time as _time
    try:
        from mpifedmeta.engine import strategy as strat
    except ImportError:
        return {"strategy": None, "error": "mpifedmeta.engine.strategy not available"}
    if not hasattr(strat, "measure"):
        return {"strategy": None, "error": "mpifedmeta.engine.strategy.measure not available"}
    cands = list(getattr(strat, "CANDIDATES", engine_strategies()))
    usable = []
    for c in cands:
        try:
            engine_block(p, c, chunk, alpha, delta)
            usable.append(c)
        except Unavailable:
            pass
    fns = {}

    def step(cand, ch):
        if (cand, ch) not in fns:
            fns[cand, ch] = engine_block(p, cand, ch, alpha, delta)
        fns[cand, ch]()

    t0 = _time.perf_counter()
    kw = {"candidates": usable} if "candidates" in inspect.signature(strat.measure).parameters else {}
    choice = strat.measure(step, device, chunk, p.B, **kw)
    return {"strategy": choice.strategy, "chunk": choice.chunk, "via": "mpifedmeta.engine.strategy.measure",
            "candidates": usable, "seconds": dict(choice.seconds), "selection_s": _time.perf_counter() - t0}


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


def finish(name: str, out: str | None, info: dict, t_start: float, payload: dict) -> str:
    """The end of every benchmark: the load average at the end, the JSON (``out`` or
    results/<name>.json) with the machine description and the wall time, one closing line."""
    info["loadavg_end"] = os.getloadavg()
    wall = time.perf_counter() - t_start
    path = write_json(out_path(out, name), {"benchmark": name, "machine": info, **payload, "wall_s": wall})
    start = info.get("loadavg_start", (float("nan"),))[0]
    print(f"load average at start {start:.2f}, at end {info['loadavg_end'][0]:.2f}")
    print(f"\nwrote {path} ({wall:.0f} s)")
    return path

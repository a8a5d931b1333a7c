"""Which backend computes a block's meta-gradients (``train.strategy``), chosen by measurement for "auto".

An explicit setting is used as is (``stacked`` for a model without a derivable stacked form runs
``vmap``: backends.resolve); a resumed run keeps the strategy recorded in its checkpoint
(so it continues bit for bit); ``auto`` times one local step of the run's algorithm on each candidate backend on the real
model, device, block size and ν, drops those whose peak memory exceeds the budget, and keeps the
fastest (the default backend — ``stacked`` where the model's stacked form can be derived, else ``vmap`` —
unless another one is faster by more than the 3% timing-noise margin). ``train.agent_chunk = "auto"`` is
chosen here too (:func:`choose_agent_chunk`).
"""

from __future__ import annotations

import dataclasses
import resource
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from mpifedmeta.parallel import devices
from mpifedmeta.engine import backends, chunks
from mpifedmeta.federation import algorithm

CANDIDATES = ("loop", "chunked", "stacked", "vmap")    # least memory first (CPU peak memory is monotonic)


@dataclass
class Choice:
    strategy: str
    chunk: int
    seconds: dict = field(default_factory=dict)     # candidate -> best seconds per meta-step
    peak_mb: dict = field(default_factory=dict)     # candidate -> peak memory (MB) seen while it ran
    skipped: dict = field(default_factory=dict)     # candidate -> reason

    def describe(self) -> str:
        parts = [f"{c}: {1e3 * s:.1f} ms" + (f", {self.peak_mb[c]:.0f} MB" if c in self.peak_mb else "")
                 for c, s in self.seconds.items()]
        parts += [f"{c}: skipped ({why})" for c, why in self.skipped.items()]
        return f"{self.strategy}" + (f" (chunk {self.chunk})" if self.strategy == "chunked" else "") + " — " + "; ".join(parts)


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PREFERENCE_MARGIN = 0.03   # within 3% of the default (timing noise), the default is kept


def pick(seconds: dict) -> str:
    """The fastest candidate; the default (stacked if timed, else vmap) when the fastest is not
    more than 3% faster than it."""
    best = min(seconds, key=seconds.get)
    preferred = "stacked" if "stacked" in seconds else "vmap"
    if preferred in seconds and seconds[best] > (1 - PREFERENCE_MARGIN) * seconds[preferred]:
        return preferred
    return best


def measure(step: Callable[[str, int], None], device: torch.device, chunk: int, block: int,
            memory_budget_mb: float = 0.0, repeats: int = 3, candidates=CANDIDATES) -> Choice:
    """Time ``step(strategy, chunk)`` (one batched meta-step) for each candidate; pick the fastest
    that stays within ``memory_budget_mb`` (0 = no limit) of memory growth."""
    seconds, peaks, skipped = {}, {}, {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = _peak_mb(device)
    for cand in candidates:
        if cand == "chunked" and chunk >= block:
            skipped[cand] = f"chunk {chunk} >= block {block}: same as vmap"
            continue
        try:
            step(cand, chunk)                          # warm-up
            _sync(device)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                step(cand, chunk)
                _sync(device)
                times.append(time.perf_counter() - t0)
        except torch.cuda.OutOfMemoryError:
            skipped[cand] = "out of memory"
            torch.cuda.empty_cache()
            continue
        except Exception as e:                        # noqa: BLE001 - e.g. vmap and data-dependent control flow
            skipped[cand] = f"cannot run the model: {first_line(e)}"
            continue
        peaks[cand] = _peak_mb(device) - base
        if memory_budget_mb and peaks[cand] > memory_budget_mb:
            skipped[cand] = f"peak {peaks[cand]:.0f} MB > budget {memory_budget_mb:.0f} MB"
            continue
        seconds[cand] = min(times)     # least disturbed by other processes
    if not seconds:
        return Choice("loop", chunk, seconds, peaks, skipped)
    return Choice(pick(seconds), chunk, seconds, peaks, skipped)


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception as one short line (torch's messages run over several); other than a
    RuntimeError (torch's own), with its type: "IndexError: index out of range in self"."""
    text = (str(e).strip() or type(e).__name__).split("\n")[0]
    if not isinstance(e, RuntimeError) and not text.startswith(type(e).__name__):
        text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def cannot_run(backend, block, w: torch.Tensor, spec, hvp: bool = False) -> str | None:
    """None if everything a run calls on ``backend`` runs for (at most) two agents of ``block``, else
    why not, in one line: one local step of the run's algorithm (its training steps, in the run's
    flavour), the evaluation's no-grad forward (``backend.logits``) and, with ``hvp``
    (eval.stationarity: exact meta-gradients whatever the flavour), a Hessian-vector product.

    What fails where (measured, torch 2.13 CPU): vmap cannot run data-dependent control flow or
    ``.item()``, nor the no-grad forward of nn.LSTM/GRU/RNN (no batching rule for aten::lstm);
    vmap and the per-agent loop cannot differentiate PyTorch's fused CPU attention twice
    (nn.TransformerEncoderLayer under exact meta-gradients); the stacked form runs both."""
    one = _one_step(block, w, spec, 2)
    try:
        with warnings.catch_warnings():        # a probe: torch's notices (vmap's slow fallbacks) belong to a run
            warnings.simplefilter("ignore")
            one(backend, 0, one.B)
            one.evaluate(backend, hvp)
    except Exception as e:                     # noqa: BLE001 - whatever stops a run, said in one line
        return first_line(e)
    return None


#: Where a run goes when a strategy cannot run the model (strategy.cannot_run): the stacked form →
#: vmap → the per-agent loop (which runs whatever plain autograd runs).
FALLBACK = {"stacked": "vmap", "chunked": "loop", "vmap": "loop", "loop": None}


class CannotRun(RuntimeError):
    """No strategy can run the model, or an explicit vmap/chunked cannot (the message is one line)."""


def runnable(setting: str, name: str, line: str, make: Callable[[str], object],
             why_not: Callable[[object], str | None]) -> tuple[str, object, str]:
    """(strategy, backend, start-up line): ``name`` if ``why_not(backend)`` is None, else the next in
    :data:`FALLBACK` that runs, the line saying why each one before could not, e.g.
    ``loop (vmap (stacked cannot run the model: …) cannot run the model: …)``. Raises
    :class:`CannotRun` where none runs, or where ``setting`` (train.strategy) is the vmap or chunked
    that cannot. ``why_not`` must give every rank the same answer (the first rank's reason)."""
    tried = []
    while True:
        backend = make(name)
        why = why_not(backend)
        if why is None:
            return name, backend, line
        if setting == name and name in ("vmap", "chunked"):
            raise CannotRun(f"train.strategy = '{setting}' cannot run this model ({why}); use train.strategy = \"loop\"")
        tried.append(f"{line if not tried else name}: {why}")
        if FALLBACK[name] is None:
            raise CannotRun(f"no strategy can run this model ({'; '.join(tried)})")
        name, line = FALLBACK[name], f"{FALLBACK[name]} ({line} cannot run the model: {why})"


class NoStrategyFits(RuntimeError):
    """No candidate backend fits train.memory_budget (the message is one line)."""


class _OneStep:
    """One local step of the run's algorithm (``algorithm.one_step()``) for the first B agents of a
    block: ``one(backend, a, b)`` runs agents [a, b) of them (what the timings measure)."""

    def __init__(self, block, w: torch.Tensor, spec, agents: int):
        self.B = B = max(1, min(agents, block.num_agents))
        self.algo, self.block, self.w = spec.algorithm.one_step(), block, w
        ids = torch.arange(block.lo, block.lo + B, device=block.device)
        spec1 = dataclasses.replace(spec, algorithm=self.algo)
        self.idx, self.mask = algorithm.round_batches(block, spec1, 0, ids, ids - block.lo)
        self.theta = chunks.broadcast(w, B)

    def __call__(self, backend, a: int, b: int) -> None:
        layout = backend.layout
        which = self.algo.state_params(layout)
        state = None if which is None else algorithm.initial_state(self.algo, layout, self.w).expand(b - a, -1).clone()
        self.algo.local_update(backend, self.theta[a:b].clone(), state, self.w, self.block.X_train,
                               self.block.Y_train, self.idx[a:b], self.mask[a:b])

    def evaluate(self, backend, hvp: bool = False) -> None:
        """What an evaluation calls besides gradients: the no-grad forward (``backend.logits``) on a
        batch of every agent's training rows; with ``hvp`` a Hessian-vector product (stationarity)."""
        theta = backend.layout.views(self.theta.clone())
        rows = self.idx[:, 0, 0]
        x, y, mask = self.block.X_train[rows], self.block.Y_train[rows], self.mask[:, 0, 0]
        with torch.no_grad():
            backend.logits(theta, x)
        if hvp:
            backend.hvp(theta, [t.clone() for t in theta], x, y, mask)


def _one_step(block, w: torch.Tensor, spec, agents: int) -> _OneStep:
    return _OneStep(block, w, spec, agents)


def choose(setting: str, model: torch.nn.Module, block, w: torch.Tensor, spec: algorithm.RoundSpec,
           agents: int, chunk: int, memory_budget_mb: float, recorded: str | None,
           allgather: Callable[[object], list], hvp: bool = False) -> tuple[str, str]:
    """The strategy this run uses and a one-line description of how it was chosen.

    ``setting``: train.strategy; ``recorded``: the strategy stored in the checkpoint when resuming
    (reused for "auto" so that a resumed run continues bit for bit); ``agents``: the per-rank
    block size to time with; ``allgather``: every rank's value of an object (all ranks agree on
    the candidate whose slowest rank is fastest). ``auto`` skips a candidate that cannot run what
    a run calls (:func:`cannot_run`, checked once in its warm-up; ``hvp``: eval.stationarity).
    The caller checks the strategy returned (:func:`runnable`).
    """
    if setting != "auto":
        return backends.resolve(setting, model)
    if recorded:
        name, desc = backends.resolve(recorded, model)
        return name, f"{desc} (recorded in the checkpoint)"
    cands = [c for c in CANDIDATES if c != "stacked" or backends.has_stacked_form(model)]
    one = _one_step(block, w, spec, agents)

    checked = set()

    def step(cand: str, chunk_: int) -> None:
        backend = backends.make(model, cand, chunk_)
        one(backend, 0, one.B)
        if cand not in checked:                       # the warm-up: also the evaluation's calls
            checked.add(cand)
            one.evaluate(backend, hvp)

    mine = measure(step, block.device, chunk, one.B, memory_budget_mb, candidates=cands)
    every = allgather((mine.seconds, mine.skipped))
    usable = [c for c in cands if all(c in sec for sec, _ in every)]
    if not usable:
        raise NoStrategyFits(f"no execution strategy fits train.memory_budget = {memory_budget_mb} MB "
                             f"({'; '.join(f'{c}: {w}' for c, w in mine.skipped.items())})")
    mine.strategy = pick({c: max(sec[c] for sec, _ in every) for c in usable})
    return mine.strategy, f"auto -> {mine.describe()}"


CHUNK_SIZES = (16, 8, 4)          # train.agent_chunk = "auto" on the CPU: the sizes timed against no chunking
CHUNK_MARGIN = 0.05               # a chunk size must be >5% faster than none to be chosen


def choose_agent_chunk(setting, device_type: str, recorded: int | None, backend, block, w: torch.Tensor, spec,
                       agents: int, allgather: Callable[[object], list]) -> tuple[int, str]:
    """train.agent_chunk: an integer as is; "auto": 32 on CUDA (fixed kernel shapes for any number of
    ranks), the recorded value on resume, else on the CPU the fastest of no chunking and
    CHUNK_SIZES for one meta-step of this rank's agents (cache-sized blocks: a block's models
    stop fitting in cache long before one agent's do). Returns (size, a short description)."""
    if setting != "auto":
        return int(setting), str(setting)
    if device_type == "cuda":
        return devices.AUTO_AGENT_CHUNK_CUDA, f"{devices.AUTO_AGENT_CHUNK_CUDA} (auto on CUDA)"
    if recorded is not None:
        return int(recorded), f"{int(recorded)} (recorded in the checkpoint)"
    one = _one_step(block, w, spec, agents)
    B = one.B
    sizes = [0] + [c for c in CHUNK_SIZES if c < B]
    if len(sizes) == 1:
        return 0, "0 (auto: a block of at most 4 agents)"

    def step(size: int, _chunk: int) -> None:
        for a, b in chunks.spans(B, size):
            one(backend, a, b)

    seconds = {}
    for size in sizes:
        seconds[size] = _best_of(lambda: step(size, 0), block.device)
    slowest = {c: max(sec[c] for sec in allgather(seconds)) for c in sizes}
    best = min(slowest, key=slowest.get)
    chosen = best if slowest[best] < (1 - CHUNK_MARGIN) * slowest[0] else 0
    timed = " / ".join(f"{1e3 * t:.1f}" for t in slowest.values())
    return chosen, f"{chosen} (auto, timed {' / '.join(str(c) for c in slowest)}: {timed} ms)"


def _best_of(fn, device: torch.device, repeats: int = 3) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best

"""A run's set-up: everything a rank needs before round 1, and the personalized evaluation.

Config → population (stored partition, or agents generated per (seed, id)) → this rank's block,
model and backend; the error protocol that every rank shares (``agreed``: the first error of any
rank becomes one BadInput everywhere) and the output directory's checks and lock. The training
loop, start and resume are in runner.py.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from mpifedmeta.core import exactsum, metagrad, rng
from mpifedmeta.engine import backends, capture
from mpifedmeta.federation import algorithm, population
from mpifedmeta.parallel import devices, dist
from mpifedmeta.run import budget
from mpifedmeta.storage import io, lock
from mpifedmeta.run.config import Config, ConfigError
from mpifedmeta.run.console import say
from mpifedmeta.data import DataError
from mpifedmeta.core.layout import ParamLayout
from mpifedmeta.models.lift import Refused, lift
from mpifedmeta.models import build_model, build_shapes, param_dict

class BadInput(RuntimeError):
    """Bad configuration, files or flags: one line, exit code 2 on every rank."""


INPUT_ERRORS = (ConfigError, DataError, dist.LaunchError, io.OutputError, lock.LockError, ValueError, OSError)
_DISK_FULL = "\x00disk-full\x00"


def agreed(world: dist.World, action, root_only: bool = False, errors: tuple = INPUT_ERRORS):
    """Run ``action()`` on every rank (rank 0 only when ``root_only``) and let every rank learn the
    first error of any rank: ``errors`` become BadInput (exit 2), io.DiskFull stays DiskFull (exit 5),
    on every rank, so that no rank is left waiting in a collective. Returns action's value (None on
    the ranks that did not run it)."""
    value, err = None, None
    if world.is_root or not root_only:
        try:
            value = action()
        except io.DiskFull as e:
            err = _DISK_FULL + str(e)
        except errors as e:
            err = str(e).splitlines()[0] if str(e) else type(e).__name__
    err = dist.first_error(world, err)
    if err and _DISK_FULL in err:
        raise io.DiskFull(28, err.replace(_DISK_FULL, ""))
    if err:
        raise BadInput(err)
    return value


def check_output_dir(out_dir: str) -> None:
    """ConfigError unless ``out_dir`` is a directory we can write or can create (checked before any set-up)."""
    if not out_dir or not out_dir.strip():
        raise ConfigError("output.dir is empty; give the directory for the results")
    probe = os.path.abspath(out_dir)
    while not os.path.exists(probe) and probe != os.path.dirname(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        where = "exists and is not a directory" if probe == os.path.abspath(out_dir) else f"{probe} is not a directory"
        raise ConfigError(f"output.dir = {out_dir!r}: {where}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"output.dir = {out_dir!r}: {probe} is not writable")


@contextlib.contextmanager
def output_lock(world: dist.World, out_dir: str):
    """Hold OUT/.lock on rank 0 for the block (every rank agrees whether it was taken: exit 2 if not)."""
    held = lock.OutputLock(out_dir) if world.is_root else None
    agreed(world, held.acquire if held else None, root_only=True)
    try:
        if held is not None and held.warning:
            print(held.warning, file=sys.stderr, flush=True)
        yield
    finally:
        if held is not None:
            held.release()


@dataclass
class Setup:
    cfg: Config
    world: dist.World
    device: torch.device
    dtype: torch.dtype
    block: object                # this rank's resident block (None for generated populations)
    model: torch.nn.Module
    num_train: int
    train_counts: np.ndarray
    eval_train_ids: np.ndarray
    holdout_ids: np.ndarray
    spec: algorithm.RoundSpec
    backend: object = None       # mpifedmeta.engine.backends; train.strategy = "auto" is resolved by choose_strategy
    strategy: str = ""
    stage: dist.HostStage = None     # the reused host buffer of the Allreduces
    device_map: list = None          # every rank's (host, device) record
    population: object = None
    eval_widths: tuple = (1, 1)  # generated populations: padding widths of the evaluated agents
    layout: ParamLayout = None   # the model's parameters <-> the flat global model w (d,)


def setup(cfg: Config, world: dist.World) -> Setup:
    """Everything a rank needs before round 1; errors on any rank become one BadInput everywhere."""
    def build():
        device = dist.choose_device(world, cfg.train.device, cfg.train.threads, cfg.train.allow_tf32)
        dtype = torch.float64 if cfg.train.dtype == "float64" else torch.float32
        pop = population.make_population(cfg.data, cfg.train.seed, cfg.train.dtype)
        N = pop.num_agents
        shapes = build_shapes(cfg.model.name, pop.input_shape, pop.num_classes, cfg.model.hidden)
        budget.check_run(cfg, world.size, pop.input_shape, sum(p.numel() for p in shapes.parameters()),
                         torch.finfo(dtype).bits // 8, device, world.local_size)
        H = cfg.data.holdout_agents
        if H >= N:
            raise ConfigError(f"data.holdout_agents = {H} must be < the {N} agents of the partition")
        if cfg.train.agents_per_round > N - H:
            raise ConfigError(f"train.agents_per_round = {cfg.train.agents_per_round} exceeds the {N - H} training agents")
        block = None
        if pop.resident:
            lo, hi = dist.block_range(N, world.size, world.rank)
            block = pop.resident_block(lo, hi, device, dtype)
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model.name, pop.input_shape, pop.num_classes, cfg.model.hidden).to(dtype)
        try:
            lift(model)                  # BatchNorm, dropout p > 0: refused whatever the strategy
        except Refused as e:
            raise ConfigError(f"model.name = {cfg.model.name!r}: {e}") from None
        strategy, _ = backends.resolve("stacked" if cfg.train.strategy == "auto" else cfg.train.strategy, model)
        backend = backends.make(model, strategy, cfg.train.chunk)   # "auto" is resolved by choose_strategy
        return device, dtype, pop, N, H, block, model, backend, strategy

    device, dtype, pop, N, H, block, model, backend, strategy = agreed(world, build)
    records, err, warnings = dist.device_map(world, device)
    if err:
        raise BadInput(err)
    for w in warnings:
        say(world, f"mpifedmeta: warning: {w}", err=True)
    num_train = N - H
    if cfg.eval.agents == "all" or cfg.eval.agents >= num_train:
        eval_ids = np.arange(num_train, dtype=np.int64)
    else:
        eval_ids = np.sort(np.random.default_rng([rng.EVAL_AGENTS, cfg.train.seed]).choice(
            num_train, cfg.eval.agents, replace=False)).astype(np.int64)
    holdout_ids = np.arange(num_train, N, dtype=np.int64)
    if cfg.eval.holdout_agents != "all" and cfg.eval.holdout_agents < H:
        holdout_ids = num_train + np.sort(np.random.default_rng([rng.EVAL_HOLDOUT, cfg.train.seed]).choice(
            H, cfg.eval.holdout_agents, replace=False)).astype(np.int64)
    t = cfg.train
    spec = algorithm.RoundSpec(t.seed, t.local_steps, t.beta, t.batch_size,
                               metagrad.MetaSpec(t.nu, t.alpha, t.metagrad, t.hf_delta, t.recompute),
                               metagrad.capture_mode(t.compile), devices.resolve_agent_chunk(t.agent_chunk, device.type))
    setup_ = Setup(cfg, world, device, dtype, block, model, num_train, pop.train_counts, eval_ids, holdout_ids, spec, backend,
                   strategy, dist.HostStage(device), records, pop)
    setup_.layout = ParamLayout.of(dict(model.named_parameters()))
    if not pop.resident:
        setup_.eval_widths = population.widths(pop, np.concatenate([eval_ids, holdout_ids]))
    model.requires_grad_(False)
    capture.ANNOUNCE = world.is_root          # train.compile's fallback notice: one line, rank 0
    return setup_


def choose_strategy(s: Setup, params: dict, recorded: str | None = None) -> str:
    """Resolve train.strategy (see mpifedmeta.engine.strategy) and build the backend; returns a one-line
    description of the choice."""
    from mpifedmeta.engine import strategy as strat

    t = s.cfg.train
    per_rank = s.spec.agent_chunk or -(-t.agents_per_round // s.world.size)   # the block size the calls will see
    blk = s.block
    if blk is None and t.strategy == "auto" and not recorded:   # generated: time on a share-sized block
        first = np.arange(min(per_rank, s.num_train), dtype=np.int64)
        blk = s.population.build(first, s.device, s.dtype, population.widths(s.population, first))
    try:
        name, desc = strat.choose(t.strategy, s.model, blk, params, s.spec, per_rank, t.chunk,
                                  t.memory_budget, recorded, lambda mine: dist.allgather(s.world, mine))
        s.backend, s.strategy = backends.make(s.model, name, t.chunk), name
    except (strat.NoStrategyFits, ValueError) as e:
        raise BadInput(str(e)) from None
    return desc


def initial_params(s: Setup) -> torch.Tensor:
    """The initial global model as one flat tensor (d,) on the rank's device."""
    return s.layout.flatten(param_dict(s.model)).to(s.device)


def cohort_block(s: Setup, cohort: np.ndarray):
    """The block a round runs on: the rank's resident block, or (generated populations) its even share
    of the cohort built now, padded to the widths of the whole cohort (the same on every rank)."""
    if s.block is not None:
        return s.block
    mine = population.share(cohort, s.world.rank, s.world.size)
    return s.population.build(mine, s.device, s.dtype, population.widths(s.population, cohort))


def _eval_blocks(s: Setup, ids: np.ndarray):
    """Blocks holding this rank's evaluated agents: the resident block, or built chunks of its share."""
    if s.block is not None:
        yield s.block
        return
    mine = population.share(ids, s.world.rank, s.world.size)
    for start in range(0, len(mine), s.cfg.eval.chunk):
        yield s.population.build(mine[start:start + s.cfg.eval.chunk], s.device, s.dtype, s.eval_widths)


def _stationarity_blocks(s: Setup):
    """Blocks covering all training agents once over the ranks (generated: chunk c on rank c mod P; O(N))."""
    if s.block is not None:
        yield s.block
        return
    chunk = s.cfg.eval.chunk
    for c in range(s.world.rank, -(-s.num_train // chunk), s.world.size):
        ids = np.arange(c * chunk, min((c + 1) * chunk, s.num_train), dtype=np.int64)
        yield s.population.build(ids, s.device, s.dtype, population.widths(s.population, ids))


def evaluate(s: Setup, params: dict, round_: int) -> dict | None:
    """Personalized metrics of all evaluated agents; the row (on rank 0) for metrics.h5."""
    ks = list(s.cfg.eval.finetune_steps)
    ids = np.concatenate([s.eval_train_ids, s.holdout_ids])
    rows = np.concatenate([np.zeros((0, 1 + 2 * len(ks)))] + [
        algorithm.evaluate_block(s.backend, blk, params, ids, ks, s.cfg.train.alpha, s.cfg.eval.chunk,
                                 s.spec.agent_chunk)
        for blk in _eval_blocks(s, ids)])
    rows = dist.gather_rows(s.world, rows)
    grad_norm_sq = meta_loss_full = float("nan")
    if s.cfg.eval.stationarity:
        d = params.numel()
        limbs = torch.zeros(2, d + 1, dtype=torch.int64, device=s.device)
        for blk in _stationarity_blocks(s):
            limbs += algorithm.stationarity_block(s.backend, blk, params, s.num_train, s.cfg.train.nu,
                                                  s.cfg.train.alpha, s.cfg.eval.chunk, s.spec.agent_chunk)
        total = exactsum.decode(s.stage.allreduce(s.world, limbs).reshape(2, -1))
        grad_norm_sq, meta_loss_full = float(np.dot(total[:-1], total[:-1])), float(total[-1])
    if not s.world.is_root:
        return None
    K = len(ks)
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    holdout = rows[:, 0] >= s.num_train
    out = {"round": round_, "grad_norm_sq": grad_norm_sq, "meta_loss_full": meta_loss_full}
    for name, sel in (("train", ~holdout), ("holdout", holdout)):
        loss, acc = rows[sel, 1:1 + K], rows[sel, 1 + K:]
        out[f"{name}_agent_loss"], out[f"{name}_agent_acc"] = loss.T.astype(np.float32), acc.T.astype(np.float32)
        with np.errstate(invalid="ignore"):
            out[f"{name}_loss_mean"] = loss.mean(axis=0) if len(loss) else np.full(K, np.nan)
            out[f"{name}_acc_mean"] = acc.mean(axis=0) if len(acc) else np.full(K, np.nan)
    return out

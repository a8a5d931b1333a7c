"""A run's set-up: everything a rank needs before round 1, computed once.

Config → population (stored partition, or agents generated per (seed, id)) → this rank's agents
(federation.population.RankAgents), the model and its flat layout, the initial global model, the
backend and agent chunk (timed for "auto"), and the :class:`~mpifedmeta.federation.algorithm.Round`
that the loop (runner.py) calls every round. Nothing here is called back during rounds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from mpifedmeta import algorithms
from mpifedmeta.core import rng
from mpifedmeta.core.layout import ParamLayout
from mpifedmeta.engine import backends, compiled, strategy
from mpifedmeta.federation import algorithm, population, server
from mpifedmeta.federation.state import AgentState
from mpifedmeta.privacy import accountant
from mpifedmeta.privacy.mechanism import PrivacySpec
from mpifedmeta.models import build_model, build_shapes, param_dict
from mpifedmeta.models.lift import Refused, lift
from mpifedmeta.parallel import dist
from mpifedmeta.run import budget
from mpifedmeta.run.config import Config, ConfigError
from mpifedmeta.run.console import say
from mpifedmeta.run.protocol import BadInput, agreed


@dataclass
class Setup:
    cfg: Config
    world: dist.World
    device: torch.device
    dtype: torch.dtype
    model: torch.nn.Module
    layout: ParamLayout          # the model's parameters <-> the flat global model w (d,)
    population: object
    num_train: int
    round: algorithm.Round       # the round, called by the loop
    w0: torch.Tensor             # the initial global model (flat, on the device)
    strategy: str                # the backend that runs, and how it was chosen (the start-up line)
    strategy_line: str
    agent_chunk_line: str
    device_map: list             # every rank's (host, device) record


def _build(cfg: Config, world: dist.World):
    """Device, population, this rank's resident block and the model; every check before allocation."""
    device = dist.choose_device(world, cfg.train.device, cfg.train.threads, cfg.train.allow_tf32)
    dtype = torch.float64 if cfg.train.dtype == "float64" else torch.float32
    pop = population.make_population(cfg.data, cfg.train.seed, cfg.train.dtype)
    N, H = pop.num_agents, cfg.data.holdout_agents
    shapes = build_shapes(cfg.model.name, pop.input_shape, pop.num_classes, cfg.model.hidden, cfg.model.values)
    layout = ParamLayout.of(dict(shapes.named_parameters()))
    algo = _algorithm(cfg, shapes, layout)
    which = algo.state_params(layout)
    budget.check_run(cfg, world.size, pop.input_shape, layout.numel, torch.finfo(dtype).bits // 8, device,
                     world.local_size, algo=algo, state_numel=0 if which is None else sum(layout.sizes[i] for i in which))
    if H >= N:
        raise ConfigError(f"data.holdout_agents = {H} must be < the {N} agents of the partition")
    if cfg.train.agents_per_round > N - H:
        raise ConfigError(f"train.agents_per_round = {cfg.train.agents_per_round} exceeds the {N - H} training agents")
    block = pop.resident_block(*dist.block_range(N, world.size, world.rank), device, dtype) if pop.resident else None
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, pop.input_shape, pop.num_classes, cfg.model.hidden, cfg.model.values).to(dtype)
    try:
        lift(model)                  # BatchNorm, dropout p > 0: refused whatever the strategy
    except Refused as e:
        raise ConfigError(f"model.name = {cfg.model.name!r}: {e}") from None
    return device, dtype, pop, block, model.requires_grad_(False)


def _eval_spec(cfg: Config, num_train: int, num_agents: int) -> algorithm.EvalSpec:
    """The evaluated agents (all, or fixed random samples) and what an evaluation computes."""
    e, seed, H = cfg.eval, cfg.train.seed, num_agents - num_train
    if e.agents == "all" or e.agents >= num_train:
        train_ids = np.arange(num_train, dtype=np.int64)
    else:     # O(e.agents), never an array of all N agents (generated populations)
        train_ids = np.sort(np.random.default_rng([rng.EVAL_AGENTS, seed]).choice(num_train, e.agents, replace=False))
    holdout_ids = np.arange(num_train, num_agents, dtype=np.int64)
    if e.holdout_agents != "all" and e.holdout_agents < H:
        holdout_ids = num_train + np.sort(np.random.default_rng([rng.EVAL_HOLDOUT, seed]).choice(
            H, e.holdout_agents, replace=False))
    return algorithm.EvalSpec(train_ids.astype(np.int64), holdout_ids.astype(np.int64), tuple(e.finetune_steps),
                              cfg.train.alpha, e.chunk, e.stationarity, cfg.train.nu)


def _round_spec(cfg: Config, num_train: int, algo, privacy: PrivacySpec | None) -> algorithm.RoundSpec:
    t = cfg.train
    return algorithm.RoundSpec(t.seed, num_train, t.agents_per_round, t.weighting, t.batch_size, algo,
                               server.ServerSpec(**cfg.server.values), cfg.privacy.sampling, privacy,
                               compiled.mode(t.compile))


def _privacy(cfg: Config, num_train: int, recorded_z: float | None) -> PrivacySpec | None:
    """The DP mechanism of ``[privacy]`` (None when privacy.clip is unset): δ defaults to 1/N^1.1; a
    target ε is calibrated into z for train.rounds rounds — once: a resume keeps the recorded z."""
    p = cfg.privacy
    if p.clip is None:
        return None
    delta = p.delta if p.delta is not None else 1.0 / num_train ** 1.1
    spec = PrivacySpec(float(p.clip), float(p.noise_multiplier or 0.0), delta, p.sampling, p.accountant, num_train,
                       cfg.train.agents_per_round)
    if p.target_epsilon is not None:
        z = recorded_z if recorded_z is not None else accountant.calibrate(spec, float(p.target_epsilon),
                                                                            cfg.train.rounds)
        spec = dataclasses.replace(spec, noise_multiplier=float(z))
    return spec


def _algorithm(cfg: Config, model, layout):
    """The run's algorithm (algorithm.name and its keys), bound to the model."""
    return algorithms.make(cfg.algorithm.values, cfg.train.values).prepare(model, layout)


def setup(cfg: Config, world: dist.World, recorded: dict | None = None) -> Setup:
    """Everything a rank needs before round 1; errors on any rank become one BadInput everywhere.

    ``recorded``: the checkpoint's {"strategy", "agent_chunk"} when resuming ("auto" settings keep
    them, so that a resumed run continues bit for bit)."""
    recorded = recorded or {}
    device, dtype, pop, block, model = agreed(world, lambda: _build(cfg, world))
    records, err, warnings = dist.device_map(world, device)
    if err:
        raise BadInput(err)
    for w in warnings:
        say(world, f"mpifedmeta: warning: {w}", err=True)
    num_train = pop.num_agents - cfg.data.holdout_agents
    evals = _eval_spec(cfg, num_train, pop.num_agents)
    layout = ParamLayout.of(dict(model.named_parameters()))
    w0 = layout.flatten(param_dict(model)).to(device)
    agents = population.RankAgents(pop, block, world.rank, world.size, device, dtype,
                                   np.concatenate([evals.train_ids, evals.holdout_ids]), cfg.eval.chunk, num_train)
    algo = agreed(world, lambda: _algorithm(cfg, model, layout))
    privacy = dist.broadcast(world, agreed(world, lambda: _privacy(cfg, num_train, recorded.get("noise_multiplier")),
                                           root_only=True))
    spec = _round_spec(cfg, num_train, algo, privacy)
    name, backend, line, chunk, chunk_line = _choose_backend(cfg, world, model, agents, w0, spec, recorded)
    spec = dataclasses.replace(spec, agent_chunk=chunk)
    compiled.ANNOUNCE = world.is_root          # train.compile's fallback notice: one line, rank 0
    which = algo.state_params(layout)
    agent_state = None if which is None or block is None else AgentState(
        block.lo, block.hi, sum(layout.sizes[i] for i in which), device, dtype)
    the_round = algorithm.Round(spec, evals, backend, agents, pop.train_counts, world, dist.HostStage(device),
                                agent_state, server.initial_state(spec.server, layout.numel))
    return Setup(cfg, world, device, dtype, model, layout, pop, num_train, the_round, w0, name, line, chunk_line,
                 records)


def _choose_backend(cfg: Config, world: dist.World, model, agents, w0, spec, recorded: dict):
    """(strategy, backend, how it was chosen, agent chunk, how it was chosen): strategy.choose and
    strategy.choose_agent_chunk on a block of this rank's size (built only when timing is needed)."""
    t = cfg.train
    fixed = t.agent_chunk if t.agent_chunk != "auto" else 0
    per_rank = fixed or -(-t.agents_per_round // world.size)     # the block size the calls will see
    timing = (t.strategy == "auto" and not recorded.get("strategy")) or \
        (t.agent_chunk == "auto" and agents.device.type == "cpu" and recorded.get("agent_chunk") is None)
    block = agents.for_timing(per_rank) if timing else None
    allgather = lambda mine: dist.allgather(world, mine)      # noqa: E731
    hvp = cfg.eval.stationarity                               # exact HVPs at evaluations, whatever the flavour
    try:
        name, line = strategy.choose(t.strategy, model, block, w0, spec, per_rank, t.chunk, t.memory_budget,
                                     recorded.get("strategy"), allgather, hvp)
        check = block or agents.for_timing(2)         # everything a run calls, on every rank; else the fallback
        name, backend, line = strategy.runnable(
            t.strategy, name, line, lambda s: backends.make(model, s, t.chunk),
            lambda be: next((r for r in allgather(strategy.cannot_run(be, check, w0, spec, hvp)) if r), None))
        chunk, chunk_line = strategy.choose_agent_chunk(t.agent_chunk, agents.device.type, recorded.get("agent_chunk"),
                                                        backend, block, w0, spec, per_rank, allgather)
    except (strategy.NoStrategyFits, strategy.CannotRun, ValueError) as e:
        raise BadInput(str(e)) from None
    return name, backend, line, chunk, chunk_line

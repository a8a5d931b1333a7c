"""The training loop: set-up, rounds, evaluation, checkpoints, signals, resume.

Data flows config → dataset → partition → this rank's block → rounds (cohort, batched local
update, one Allreduce) → rank 0 writes HDF5. Every rank runs the same code; only rank 0 writes
and prints.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from . import __version__, algorithm, backends, capture, devices, dist, exactsum, io, metagrad, population, rng, signals
from .config import Config, ConfigError, from_json, keys_where
from .console import Progress, final_table, say
from .data import DataError
from .models import build_model, param_dict

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_STOPPED, EXIT_DIVERGED = 0, 1, 2, 3, 4
# Keys that may change between a run and its resumption (flagged in config.SCHEMA).
RESUMABLE_KEYS = keys_where("resumable")


class BadInput(RuntimeError):
    """Bad configuration, files or flags: one line, exit code 2 on every rank."""




@dataclass
class Setup:
    cfg: Config
    world: dist.World
    device: torch.device
    dtype: torch.dtype
    partition: object            # the stored partition (None for generated populations)
    block: object                # this rank's resident block (None for generated populations)
    model: torch.nn.Module
    loss: object
    logits: object
    num_train: int
    train_counts: np.ndarray
    eval_train_ids: np.ndarray
    holdout_ids: np.ndarray
    spec: algorithm.RoundSpec
    backend: object = None       # mpifedmeta.backends; train.strategy = "auto" is resolved by choose_strategy
    strategy: str = ""
    stage: dist.HostStage = None     # the reused host buffer of the Allreduces
    device_map: list = None          # every rank's (host, device) record
    population: object = None
    eval_widths: tuple = (1, 1)  # generated populations: padding widths of the evaluated agents


def setup(cfg: Config, world: dist.World) -> Setup:
    """Everything a rank needs before round 1; errors on any rank become one BadInput everywhere."""
    err = None
    try:
        device = dist.choose_device(world, cfg.train.device, cfg.train.threads, cfg.train.allow_tf32)
        dtype = torch.float64 if cfg.train.dtype == "float64" else torch.float32
        pop = population.make_population(cfg.data, cfg.train.seed, cfg.train.dtype)
        N = pop.num_agents
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
        strategy = cfg.train.strategy
        if strategy == "auto" or (strategy == "stacked" and not backends.has_stacked_form(model)):
            strategy = backends.default_strategy(model)   # "stacked" means vmap for a model without a stacked form
        backend = backends.make(model, strategy, cfg.train.chunk)   # "auto" is resolved by choose_strategy
    except (ConfigError, DataError, dist.LaunchError, ValueError, OSError) as e:
        err = str(e).splitlines()[0] if str(e) else type(e).__name__
    err = dist.first_error(world, err)
    if err:
        raise BadInput(err)
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
    setup_ = Setup(cfg, world, device, dtype, getattr(pop, "partition", None), block, model, metagrad.make_loss(model),
                   metagrad.make_logits(model), num_train, pop.train_counts, eval_ids, holdout_ids, spec, backend,
                   strategy, dist.HostStage(device), records, pop)
    if not pop.resident:
        setup_.eval_widths = population.widths(pop, np.concatenate([eval_ids, holdout_ids]))
    model.requires_grad_(False)
    capture.ANNOUNCE = world.is_root          # train.compile's fallback notice: one line, rank 0
    return setup_


def choose_strategy(s: Setup, params: dict, recorded: str | None = None) -> str:
    """Resolve train.strategy (see mpifedmeta.strategy) and build the backend; returns a one-line
    description of the choice."""
    from . import strategy as strat

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


def initial_params(s: Setup) -> dict[str, torch.Tensor]:
    return {k: v.to(s.device) for k, v in param_dict(s.model).items()}


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
        d = sum(v.numel() for v in params.values())
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


def _params_numpy(params: dict) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in params.items()}


class _MetricsBuffer:
    """Rows of metrics.h5 not yet written; rank 0 appends them at each evaluation and checkpoint."""

    def __init__(self, world: dist.World, out_dir: str):
        self.world, self.out_dir = world, out_dir
        self.train: list[dict] = []
        self.eval: list[dict] = []

    def flush(self) -> None:
        if self.world.is_root:
            io.append_metrics(self.out_dir, self.train, self.eval)
        self.train, self.eval = [], []


def _due(round_: int, every: int, last: int) -> bool:
    return round_ % every == 0 or round_ == last


def _run_round(s: Setup, params: dict, r: int) -> tuple[dict | None, float, int, int, dict]:
    """Local round on every rank, then the server step; (params, meta-loss, bad terms, stop, timings)."""
    cohort = rng.cohort(s.cfg.train.seed, r, s.num_train, s.cfg.train.agents_per_round)
    weights = algorithm.aggregation_weights(cohort, s.train_counts, s.cfg.train.weighting)
    tc = time.perf_counter()
    limbs, bad = algorithm.local_round(s.backend, cohort_block(s, cohort), params, s.spec, r, cohort, weights)
    if limbs.is_cuda:
        torch.cuda.synchronize(limbs.device)
    t_compute = time.perf_counter() - tc
    _maybe_inject_failure(s.world, r)
    stop = 1 if signals.requested() else 0
    new_params, meta_loss, (bad, stop), timings = algorithm.aggregate(s.world, s.stage, limbs, bad, [stop], params)
    # every rank's compute time, max and min: load imbalance told apart from communication
    timings["compute_time"], timings["compute_time_min"] = dist.max_min(s.world, t_compute)
    return new_params, meta_loss, bad, stop, timings


def _report_divergence(world: dist.World, r: int, bad: int) -> int:
    say(world, f"mpifedmeta: diverged in round {r}: {bad} non-finite or out-of-range (|value| >= "
               f"{exactsum.LIMIT:g}) parameter terms; keeping the last good checkpoint. "
               "Lower train.beta / train.alpha.", err=True)
    return EXIT_DIVERGED


def _report_stop(world: dist.World, r: int, out_dir: str) -> int:
    say(world, f"mpifedmeta: {_now()} stop requested ({signals.requested() or 'signal on another rank'}); "
               f"checkpoint of round {r} written to {out_dir}; continue with `mpifedmeta resume {out_dir}` "
               f"(exit code {EXIT_STOPPED})", err=True)
    return EXIT_STOPPED


def _checkpoint(s: Setup, out_dir: str, r: int, params: dict, wall: float) -> None:
    if s.world.is_root:
        io.write_checkpoint(out_dir, r, _params_numpy(params), s.cfg.to_json(), _ckpt_attrs(s, wall),
                            s.cfg.output.keep)
    dist.barrier(s.world)


def _finish(s: Setup, out_dir: str, last_eval: dict | None, wall: float) -> None:
    """Rank 0: the final accuracy table and the closing line."""
    if not s.world.is_root:
        return
    if last_eval is None:
        last_eval = _last_eval_row(out_dir)
    if last_eval is not None:
        print(final_table(list(s.cfg.eval.finetune_steps), last_eval), flush=True)
    print(f"done: {s.cfg.train.rounds} rounds, {wall:.1f} s of training; results in {out_dir}", flush=True)


def train(s: Setup, out_dir: str, params: dict, start_round: int, wall0: float) -> int:
    """Rounds start_round+1 .. cfg.train.rounds; returns the exit code (0, 3 stopped, 4 diverged)."""
    cfg, R = s.cfg, s.cfg.train.rounds
    metrics = _MetricsBuffer(s.world, out_dir)
    progress = Progress(s.world, start_round, R, cfg.output.progress_every)
    last_eval, wall, code = None, wall0, EXIT_OK
    try:
        for r in range(start_round + 1, R + 1):
            t0 = time.perf_counter()
            new_params, meta_loss, bad, stop, timings = _run_round(s, params, r)
            if bad:
                code = _report_divergence(s.world, r, bad)
                break
            params = new_params
            round_time = time.perf_counter() - t0
            wall += round_time
            metrics.train.append({"round": r, "meta_loss": meta_loss, "wall_time": wall, "round_time": round_time,
                                  "num_sampled": cfg.train.agents_per_round, **timings})
            evaluated = _due(r, cfg.eval.every, R)
            if evaluated:
                last_eval = evaluate(s, params, r)
                if s.world.is_root:
                    metrics.eval.append(last_eval)
            progress.update(r, R, meta_loss, round_time, last_eval if evaluated else None)
            checkpointed = _due(r, cfg.output.checkpoint_every, R) or bool(stop)
            if checkpointed or evaluated:
                metrics.flush()     # metrics first: a crash in between leaves rows the resume truncates
            if checkpointed:
                _checkpoint(s, out_dir, r, params, wall)
            if stop and r < R:
                code = _report_stop(s.world, r, out_dir)
                break
    finally:
        progress.close()
    metrics.flush()
    if code == EXIT_OK:
        _finish(s, out_dir, last_eval, wall)
    return code


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _maybe_inject_failure(world: dist.World, round_: int) -> None:
    """Fault injection for tests: MPIFEDMETA_INJECT_FAILURE="RANK:ROUND" raises on that rank in that round."""
    spec = os.environ.get("MPIFEDMETA_INJECT_FAILURE")
    if spec:
        rank, at = (int(v) for v in spec.split(":"))
        if rank == world.rank and at == round_:
            raise RuntimeError(f"injected failure on rank {rank} in round {round_} (MPIFEDMETA_INJECT_FAILURE)")


def _last_eval_row(out_dir: str) -> dict | None:
    e = io.read_table(out_dir, "eval")
    if len(e["round"]) == 0:
        return None
    return {k: e[k][-1] for k in io.EVAL_AGENTS}


def start_new(cfg: Config, world: dist.World) -> int:
    out_dir = cfg.output.dir
    err = None
    if world.is_root and os.path.exists(io.metrics_path(out_dir)):
        err = (f"output.dir = {out_dir!r} already holds a run (metrics.h5); continue it with "
               f"`mpifedmeta resume {out_dir}` or choose another output.dir")
    err = dist.first_error(world, err)
    if err:
        raise BadInput(err)
    s = setup(cfg, world)
    params = initial_params(s)
    chosen = choose_strategy(s, params)
    if world.is_root:
        os.makedirs(out_dir, exist_ok=True)
        arrays, attrs = s.population.metadata(s.num_train)
        io.create_metrics(out_dir, cfg.to_json(), _file_attrs(s, params), arrays, {**attrs, "dataset": cfg.data.dataset},
                          list(cfg.eval.finetune_steps), s.eval_train_ids, s.holdout_ids)
    row = evaluate(s, params, 0)
    if world.is_root:
        io.append_metrics(out_dir, [], [row])
        io.write_checkpoint(out_dir, 0, _params_numpy(params), cfg.to_json(), _ckpt_attrs(s, 0.0), cfg.output.keep)
        say(world, f"mpifedmeta {__version__}: {s.population.num_agents} agents ({s.population.num_agents - s.num_train} holdout) on "
                   f"{world.size} rank(s), {cfg.model.name} with {sum(v.numel() for v in params.values())} parameters, "
                   f"nu={cfg.train.nu} {cfg.train.metagrad}, device {s.device}, strategy {chosen}")
    dist.barrier(world)
    return train(s, out_dir, params, 0, 0.0)


def _ckpt_attrs(s: Setup, wall: float) -> dict:
    return {"wall_time": wall, "strategy": s.strategy, "rng": "counter-based: (seed, round, agent, step)",
            "agent_chunk": s.spec.agent_chunk}


def _file_attrs(s: Setup, params: dict) -> dict:
    return {"mpifedmeta_version": __version__, "torch_version": str(torch.__version__),
            "strategy": s.strategy, "strategy_setting": s.cfg.train.strategy, "num_params": int(sum(v.numel() for v in params.values())),
            "world_size_at_start": s.world.size, **_device_attrs(s)}


def _device_attrs(s: Setup) -> dict:
    """What the results' bits depend on besides the config: device, fixed agent chunk, numerics."""
    cuda = s.device.type == "cuda"
    names = sorted({f"{r['name']}" + (f" ({r['sms']} SMs)" if r.get("sms") else "") for r in s.device_map})
    return {"device": s.device.type, "device_names": "; ".join(names), "agent_chunk": int(s.spec.agent_chunk),
            "tf32": bool(cuda and s.cfg.train.allow_tf32), "cuda_deterministic": cuda,
            "cuda_version": str(torch.version.cuda or "")}


def resume(out_dir: str, world: dist.World, rounds: int | None = None) -> int:
    """Continue the run in ``out_dir`` from its latest checkpoint (to ``rounds`` in total if given)."""
    err, payload = None, None
    if world.is_root:
        try:
            payload = _load_resume_state(out_dir, rounds)
        except (io.OutputError, ConfigError) as e:
            err = str(e)
    err = dist.first_error(world, err)
    if err:
        raise BadInput(err)
    cfg_json, round_, flat_params, wall, recorded = dist.broadcast(world, payload)
    cfg = from_json(cfg_json)
    if round_ >= cfg.train.rounds:
        say(world, f"{out_dir}: already complete ({round_} of {cfg.train.rounds} rounds); "
                   "nothing to do (use --rounds N to train further)")
        return EXIT_OK
    s = setup(cfg, world)
    like = initial_params(s)
    mismatch = [k for k in like if k not in flat_params or tuple(flat_params[k].shape) != tuple(like[k].shape)]
    if mismatch:
        raise BadInput(f"{out_dir}: checkpoint parameters do not match the model ({', '.join(mismatch[:3])})")
    params = {k: torch.as_tensor(flat_params[k]).to(device=s.device, dtype=s.dtype) for k in like}
    choose_strategy(s, params, recorded)
    say(world, f"mpifedmeta: {_now()} resuming {out_dir} at round {round_} of {cfg.train.rounds} on {world.size} rank(s)")
    return train(s, out_dir, params, round_, wall)


def _load_resume_state(out_dir: str, rounds: int | None):
    metrics_json = io.read_metrics_config(out_dir)
    ckpts = io.list_checkpoints(out_dir)
    if not ckpts:
        raise io.OutputError(f"{out_dir}: no checkpoints/round_NNNNNN.h5 to resume from")
    round_, params, ckpt_json, attrs = io.read_checkpoint(ckpts[-1][1])
    diffs = io.config_json_equal(metrics_json, ckpt_json, RESUMABLE_KEYS)
    if diffs:
        raise io.OutputError(f"{ckpts[-1][1]}: checkpoint config does not match metrics.h5 ({', '.join(diffs[:5])})")
    raw = json.loads(ckpt_json)
    raw["output"]["dir"] = out_dir
    if rounds is not None:
        if rounds < round_:
            raise ConfigError(f"--rounds {rounds} is before the checkpoint's round {round_}")
        raw["train"]["rounds"] = rounds
    cfg_json = from_json(json.dumps(raw)).to_json()
    dropped = io.truncate_metrics(out_dir, round_)
    if dropped:
        print(f"mpifedmeta: dropped {dropped} metrics rows written after the checkpoint of round {round_}", flush=True)
    return cfg_json, round_, params, float(attrs.get("wall_time", 0.0)), attrs.get("strategy")


def auto_resume_or_start(cfg: Config, world: dist.World) -> int:
    """`run --auto-resume`: resume OUT if it holds a run of the same config, else start it."""
    out_dir = cfg.output.dir
    exists = dist.broadcast(world, os.path.exists(io.metrics_path(out_dir)) if world.is_root else None)
    if not exists:
        return start_new(cfg, world)
    err = None
    if world.is_root:
        try:
            diffs = io.config_json_equal(io.read_metrics_config(out_dir), cfg.to_json(), RESUMABLE_KEYS)
            if diffs:
                err = (f"output.dir = {out_dir!r} holds a run with a different config ({', '.join(diffs[:5])}); "
                       "choose another output.dir")
        except io.OutputError as e:
            err = str(e)
    err = dist.first_error(world, err)
    if err:
        raise BadInput(err)
    return resume(out_dir, world, cfg.train.rounds)

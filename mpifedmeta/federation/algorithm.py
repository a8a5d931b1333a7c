"""One round of any algorithm (mpifedmeta/algorithms/) and the personalized evaluation: everything a round does.

:class:`Round` is the round: (1) the cohort, drawn from (seed, round) identically on every rank,
and its integer weights; (2) :func:`local_round`, the algorithm's batched local update of this
rank's share of the cohort (its per-agent state read and stored), exactly summed as int64; (3)
:func:`server_step`, one Allreduce, the mean update and the server optimizer (server.py).
:meth:`Round.evaluate` gives the personalized metrics of the evaluated agents. The global model is
a flat tensor w (d,) (core/layout.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.profiler import record_function

from mpifedmeta.algorithms.base import Algorithm, concat, select
from mpifedmeta.core import exactsum, metagrad, rng
from mpifedmeta.engine import chunks, compiled
from mpifedmeta.parallel import dist
from mpifedmeta.federation import server
from mpifedmeta.federation.block import AgentBlock, padded_rows
from mpifedmeta.federation.state import AgentState, gather
from mpifedmeta.privacy import mechanism
from mpifedmeta.privacy.mechanism import PrivacySpec


@dataclass(frozen=True)
class RoundSpec:
    """Every hyper-parameter of a round (plain values, no config object)."""
    seed: int
    num_train: int              # the training agents 0 .. num_train − 1 the cohort is drawn from
    agents_per_round: int
    weighting: str              # uniform | samples
    batch_size: int | str
    algorithm: Algorithm        # its local update, batch slots, state and personalized model
    server: server.ServerSpec = server.ServerSpec()
    sampling: str = "fixed"     # privacy.sampling: fixed-size cohorts | poisson (each agent with probability m/N)
    privacy: PrivacySpec | None = None    # DP-FedAvg: clipped updates, Gaussian noise, fixed denominator
    compile: str = "off"        # train.compile: off | compile | cudagraphs
    agent_chunk: int = 0        # agents per batched call, last chunk padded (0 = the whole block at once)


@dataclass(frozen=True)
class EvalSpec:
    """What an evaluation computes: the evaluated agents, the k's, α, batching, the diagnostic."""
    train_ids: np.ndarray
    holdout_ids: np.ndarray
    finetune_steps: tuple[int, ...]
    alpha: float
    chunk: int
    stationarity: bool
    nu: int


@dataclass
class RoundResult:
    """A finished round: the new global model (None when it diverged), the weighted mean training
    loss, how many local-model chunks left the range, this rank's compute time and the Allreduce's."""
    w: torch.Tensor | None
    train_loss: float
    bad: int
    compute_time: float
    timings: dict
    num_sampled: int = 0


def cohort_weights(cohort: np.ndarray, train_counts, weighting: str) -> np.ndarray:
    """Integer weights c_i of the cohort's agents (uniform: 1, samples: n_i), identical on every
    rank; the average is Σ c_i·θ_i / Σ c_i."""
    if weighting == "uniform":
        return np.ones(len(cohort), dtype=np.int64)
    return np.asarray(train_counts[cohort], dtype=np.int64)


@dataclass
class BlockSums:
    """A block's exact contribution to a round: int64 sums of the scaled displacements (d,), of the
    weighted training losses (2 limbs), and how many of its chunks had a local model leave the range."""
    displacements: torch.Tensor
    loss: torch.Tensor
    bad: torch.Tensor


def round_batches(block: AgentBlock, spec: RoundSpec, round_: int, ids: torch.Tensor,
                  positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample indices (B, steps, slots, b) into the block's training tensors and their mask
    (the algorithm's steps and slots)."""
    tau, slots = spec.algorithm.steps, spec.algorithm.slots
    if spec.batch_size == "full":
        idx, mask = padded_rows(block.train_offset, block.train_count, positions, block.train_width)
        shape = (idx.shape[0], tau, 1, idx.shape[1])
        return idx[:, None, None, :].expand(shape), mask[:, None, None, :].expand(shape).to(block.X_train.dtype)
    pos = rng.batch_indices(spec.seed, round_, ids, block.train_count[positions], tau, slots, spec.batch_size)
    idx = block.train_offset[positions].view(-1, 1, 1, 1) + pos
    return idx, torch.ones(idx.shape, dtype=block.X_train.dtype, device=idx.device)


def _restore_unshared(algo: Algorithm, layout, theta: torch.Tensor, w: torch.Tensor) -> None:
    """Parameters the algorithm does not share are uploaded as w (a zero displacement)."""
    shared = algo.shared_params(layout)
    if shared is None:
        return
    views, global_ = layout.views(theta), layout.views(w.expand(theta.shape))
    for i in range(len(views)):
        if i not in shared:
            views[i].copy_(global_[i])


def initial_state(algo: Algorithm, layout, w: torch.Tensor) -> torch.Tensor | None:
    """A first-time agent's state: the algorithm's state parameters of the global model (size,)."""
    which = algo.state_params(layout)
    return None if which is None else concat(layout.views(w.unsqueeze(0)), which)[0]


def local_round(backend, block: AgentBlock, w: torch.Tensor, spec: RoundSpec, round_: int,
                cohort: np.ndarray, weights: np.ndarray, state: AgentState | None = None) -> BlockSums:
    """Run the algorithm's local update of this block's sampled agents; return their exact sums.

    ``w``: the flat global model (d,); ``weights``: the cohort's integer weights c_i
    (:func:`cohort_weights`); ``state``: the block's per-agent state (stateful algorithms), read
    and stored here. Agents of other blocks contribute nothing. The agents go through the backend
    in chunks (chunks.each) of ``spec.agent_chunk``; results stay on the device.
    """
    dev, d, algo = block.device, w.numel(), spec.algorithm
    total_weight = int(weights.sum())
    sums = BlockSums(torch.zeros(d, dtype=torch.int64, device=dev), torch.zeros(2, 1, dtype=torch.int64, device=dev),
                     torch.zeros((), dtype=torch.int64, device=dev))
    mine, positions = block.locate(cohort)
    if not mine.any():
        return sums
    B = int(mine.sum())
    c = weights[mine].astype(np.float64)
    # ids, positions in the block and weights (float64 bits as int64) go to the device in one copy
    packed = torch.from_numpy(np.concatenate([cohort[mine].astype(np.int64), positions.astype(np.int64),
                                              c.view(np.int64)])).to(dev)
    ids, positions, c = packed[:B], packed[B:2 * B], packed[2 * B:].view(torch.float64)
    scale, p = c * 2.0 ** exactsum.grid_bits(total_weight), c / total_weight
    idx, mask = round_batches(block, spec, round_, ids, positions)
    rows = None if state is None else state.rows(positions, initial_state(algo, backend.layout, w))
    fixed = chunks.fixed_shapes(dev)
    loss_terms = []
    for a, b, (i,), (m,) in chunks.each(B, spec.agent_chunk, (idx,), (mask,), fixed):
        s = None if rows is None else (chunks.pad(rows[a:b], i.shape[0]) if fixed and spec.agent_chunk else rows[a:b])
        with record_function("mpifedmeta.local_update"):
            theta, losses, s = compiled.run(spec.compile, algo, backend, chunks.broadcast(w, i.shape[0]), s, w,
                                            block.X_train, block.Y_train, i, m)
        if state is not None:
            state.store(positions[a:b], s[:b - a])
        _restore_unshared(algo, backend.layout, theta, w)
        if spec.privacy is not None:
            with record_function("mpifedmeta.clip"):
                mechanism.clip_updates(theta, w, spec.privacy.clip)
        with record_function("mpifedmeta.exact_sum"):
            q, bad = exactsum.encode_displacements(theta[:b - a], w, scale[a:b].to(w.dtype))
        sums.displacements += q
        sums.bad += bad
        loss_terms.append(losses[:b - a].to(torch.float64).mean(dim=1) * p[a:b])
    sums.loss = exactsum.encode_sum(torch.cat(loss_terms).unsqueeze(1))
    return sums


def server_step(world: dist.World, stage: dist.HostStage, sums: BlockSums, w: torch.Tensor,
                total_weight: int, opt: server.ServerSpec = server.ServerSpec(),
                opt_state: dict | None = None, noise: np.ndarray | None = None,
                denominator: int = 0) -> tuple[torch.Tensor | None, float, int, dict, dict]:
    """The server step: one SUM Allreduce of every rank's sums, the mean update Δ, the server optimizer.

    The device values reach the host in one copy into ``stage``'s reused buffer. With ``noise``
    (differential privacy: float64 (d,), the same on every rank) Δ = (Σ Δ̃_i + noise) / ``denominator``
    (fixed; the weights are 1), else Δ = Σ c_i·Δ_i / Σ c_i. Returns (the new flat global model, typed
    and placed like ``w`` — None when a local model left the range anywhere —, the weighted mean
    training loss (nan then, or for an empty cohort), the bad count, {"allreduce_time",
    "bytes_allreduced"}, the optimizer's new state (``opt_state`` itself when it diverged))."""
    t0 = time.perf_counter()
    local = torch.cat([sums.displacements, sums.loss.reshape(-1), sums.bad.reshape(1)])
    with record_function("mpifedmeta.allreduce"):
        buf = stage.allreduce(world, local)
    timings = {"allreduce_time": time.perf_counter() - t0, "bytes_allreduced": buf.nbytes}
    d, bad = w.numel(), int(buf[-1])
    opt_state = server.initial_state(opt, d) if opt_state is None else opt_state
    if bad:
        return None, float("nan"), bad, timings, opt_state
    w64 = w.detach().to(torch.float64).cpu().numpy()
    bits = exactsum.grid_bits(max(1, total_weight))
    if noise is None:
        delta = exactsum.decode_displacements(buf[:d], np.zeros(()), bits, total_weight)
    else:
        delta = (exactsum.decode_displacements(buf[:d], np.zeros(()), bits, 1) + noise) / denominator
    new, new_state = server.step(opt, w64, delta, opt_state)
    if not np.all(np.abs(new) < exactsum.LIMIT):
        return None, float("nan"), int(np.sum(~(np.abs(new) < exactsum.LIMIT))), timings, opt_state
    train_loss = float(exactsum.decode(buf[d:d + 2].reshape(2, 1))[0]) if total_weight else float("nan")
    return torch.as_tensor(new, dtype=w.dtype).to(w.device), train_loss, 0, timings, new_state


def _eval_chunk(agent_chunk: int, chunk: int, device: torch.device) -> tuple[int, bool]:
    """Agents per evaluation call and whether the calls are padded to exactly that many."""
    return (agent_chunk, chunks.fixed_shapes(device)) if agent_chunk else (chunk, False)


def evaluate_block(backend, block: AgentBlock, w: torch.Tensor, agent_ids: np.ndarray,
                   ks: list[int], alpha: float, chunk: int, agent_chunk: int = 0,
                   algo: Algorithm | None = None, state: AgentState | None = None) -> np.ndarray:
    """Personalized test loss/accuracy of this block's agents among ``agent_ids``.

    Returns rows [agent id, loss_k for k in ks…, acc_k for k in ks…] (float64) for the agents
    this block owns, fine-tuned with k full-batch steps of size α on their own training split;
    with an algorithm that has a personalized model (``algo.personalized``) two more columns, the
    test loss and accuracy of that model (from the agents' ``state`` where they have one).
    Batched ``chunk`` agents per call, or exactly ``agent_chunk`` when > 0 (padded, dummies dropped).
    """
    personal = algo is not None and algo.personalized
    held, pos = block.locate(agent_ids)
    mine = agent_ids[held]
    if len(mine) == 0:
        return np.zeros((0, 1 + 2 * len(ks) + 2 * personal))
    pos = torch.as_tensor(pos, device=block.device)
    dt = block.X_train.dtype
    tr_idx, tr_mask = padded_rows(block.train_offset, block.train_count, pos, block.train_width)
    te_idx, te_mask = padded_rows(block.test_offset, block.test_count, pos, block.test_width)
    size, fixed = _eval_chunk(agent_chunk, chunk, block.device)
    cols = []
    for a, b, (tri, tei, p), (trm, tem) in chunks.each(len(mine), size, (tr_idx, te_idx, pos),
                                                       (tr_mask.to(dt), te_mask.to(dt)), fixed):
        train = metagrad.Split(block.X_train, block.Y_train, tri, trm)
        test = metagrad.Split(block.X_test, block.Y_test, tei, tem)
        loss, acc = metagrad.personalized_metrics(backend, w, train, test, ks, alpha)
        out = [loss[:b - a], acc[:b - a]]
        if personal:
            stored = None if state is None else state.rows(p, initial_state(algo, backend.layout, w))
            has = None if state is None else state.has[p]
            models = algo.personalize(backend, w, stored, has, metagrad.take(train.X, tri),
                                      metagrad.take(train.Y, tri), trm)
            pl, pa = metagrad.test_metrics(backend, backend.layout.views(models), test)
            out += [pl[:b - a, None], pa[:b - a, None]]
        cols.append(torch.cat(out, dim=1))
    return np.concatenate([mine[:, None].astype(np.float64), torch.cat(cols).double().cpu().numpy()], axis=1)


def stationarity_block(backend, block: AgentBlock, w: torch.Tensor, num_train: int, nu: int, alpha: float,
                       chunk: int, agent_chunk: int = 0) -> torch.Tensor:
    """The block's exact share of [∇F(w), F(w)] with F = (1/N) Σ_i f_i(θ_i^ν) over the N training
    agents, full local training data, exact meta-gradient. Returns int64 limbs (2, d + 1).
    Batched ``chunk`` agents per call, or exactly ``agent_chunk`` when > 0 (padded, dummies dropped)."""
    total = torch.zeros(2, w.numel() + 1, dtype=torch.int64, device=block.device)
    training = torch.as_tensor(np.flatnonzero(block.global_ids() < num_train), device=block.device)
    idx, mask = padded_rows(block.train_offset, block.train_count, training, block.train_width)
    size, fixed = _eval_chunk(agent_chunk, chunk, block.device)
    for a, b, (i,), (m,) in chunks.each(len(training), size, (idx,), (mask.to(block.X_train.dtype),), fixed):
        theta = backend.layout.views(chunks.broadcast(w, i.shape[0]))
        g, value = metagrad.block_meta_gradients(backend, theta, block.X_train, block.Y_train,
                                                 i[:, None, :], m[:, None, :], metagrad.MetaSpec(nu, alpha, "exact"))
        terms = torch.cat([t[:b - a].reshape(b - a, -1).to(torch.float64) for t in g]
                          + [value[:b - a].to(torch.float64)[:, None]], dim=1)
        total += exactsum.encode_sum(terms / num_train)
    return total


class Round:
    """One round of the algorithm on this rank, and the evaluation: set up once, called every round.

    ``agents``: federation.population.RankAgents (the blocks this rank computes on);
    ``train_counts``: training samples per agent id (indexable by an id array); ``state``: the
    resident block's per-agent state (stateful algorithms), ``server_state`` the server optimizer's."""

    def __init__(self, spec: RoundSpec, evals: EvalSpec, backend, agents, train_counts, world: dist.World,
                 stage: dist.HostStage, state: AgentState | None = None, server_state: dict | None = None):
        self.spec, self.evals, self.backend, self.agents = spec, evals, backend, agents
        self.train_counts, self.world, self.stage = train_counts, world, stage
        self.state, self.server_state = state, server_state
        shared = spec.algorithm.shared_params(backend.layout)
        self.shared_mask = None if shared is None else np.concatenate(
            [np.full(n, i in shared) for i, n in enumerate(backend.layout.sizes)])

    def cohort(self, round_: int) -> np.ndarray:
        """The round's cohort: fixed-size, or Poisson-sampled (privacy.sampling); the same on every rank."""
        s = self.spec
        if s.sampling == "poisson":
            return rng.poisson_cohort(s.seed, round_, s.num_train, s.agents_per_round / s.num_train)
        return rng.cohort(s.seed, round_, s.num_train, s.agents_per_round)

    def run(self, w: torch.Tensor, round_: int) -> RoundResult:
        s = self.spec
        # 1. the cohort (the same on every rank) and its integer weights
        cohort = self.cohort(round_)
        weights = cohort_weights(cohort, self.train_counts, s.weighting)
        # 2. the algorithm's local update of this rank's share, exactly summed
        t0 = time.perf_counter()
        sums = local_round(self.backend, self.agents.for_round(cohort), w, s, round_, cohort, weights, self.state)
        if w.is_cuda:
            torch.cuda.synchronize(w.device)
        compute = time.perf_counter() - t0
        # 3. the server step: one Allreduce, (the noise,) the mean update, the server optimizer
        noise = None if s.privacy is None else mechanism.noise(s.privacy, s.seed, round_, w.numel(), self.shared_mask)
        new, loss, bad, timings, self.server_state = server_step(self.world, self.stage, sums, w, int(weights.sum()),
                                                                 s.server, self.server_state, noise,
                                                                 s.agents_per_round)
        return RoundResult(new, loss, bad, compute, timings, len(cohort))

    def agent_state(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Every agent's state (values, has) on rank 0 (a collective call; None elsewhere or stateless)."""
        return None if self.state is None else gather(self.world, self.state)

    def evaluate(self, w: torch.Tensor, round_: int) -> dict | None:
        """Personalized metrics of every evaluated agent; the row for metrics.h5 on rank 0 (else None)."""
        e, algo = self.evals, self.spec.algorithm
        ks, ids = list(e.finetune_steps), np.concatenate([e.train_ids, e.holdout_ids])
        width = 1 + 2 * len(ks) + 2 * algo.personalized
        rows = np.concatenate([np.zeros((0, width))] + [
            evaluate_block(self.backend, blk, w, ids, ks, e.alpha, e.chunk, self.spec.agent_chunk, algo,
                           self.state if blk is self.agents.block else None)
            for blk in self.agents.for_evaluation(ids)])
        rows = dist.gather_rows(self.world, rows)
        grad_norm_sq, meta_loss_full = self._stationarity(w) if e.stationarity else (float("nan"), float("nan"))
        if not self.world.is_root:
            return None
        return eval_row(round_, rows, len(ks), self.spec.num_train, grad_norm_sq, meta_loss_full)

    def _stationarity(self, w: torch.Tensor) -> tuple[float, float]:
        """(‖∇F(w)‖², F(w)) over all training agents, exact, full local data."""
        e, limbs = self.evals, torch.zeros(2, w.numel() + 1, dtype=torch.int64, device=w.device)
        for blk in self.agents.for_stationarity():
            limbs += stationarity_block(self.backend, blk, w, self.spec.num_train, e.nu, e.alpha, e.chunk,
                                        self.spec.agent_chunk)
        total = exactsum.decode(self.stage.allreduce(self.world, limbs).reshape(2, -1))
        return float(np.dot(total[:-1], total[:-1])), float(total[-1])


def eval_row(round_: int, rows: np.ndarray, K: int, num_train: int, grad_norm_sq: float,
             meta_loss_full: float) -> dict:
    """The gathered per-agent rows [id, loss_k…, acc_k…] as metrics.h5's evaluation row."""
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    holdout = rows[:, 0] >= num_train
    personal = rows.shape[1] > 1 + 2 * K
    out = {"round": round_, "grad_norm_sq": grad_norm_sq, "meta_loss_full": meta_loss_full}
    for name, sel in (("train", ~holdout), ("holdout", holdout)):
        loss, acc = rows[sel, 1:1 + K], rows[sel, 1 + K:1 + 2 * K]
        if personal:
            prefix = "personal" if name == "train" else "holdout_personal"
            pl, pa = rows[sel, 1 + 2 * K], rows[sel, 2 + 2 * K]
            out[f"{prefix}_agent_loss"], out[f"{prefix}_agent_acc"] = pl.astype(np.float32), pa.astype(np.float32)
            with np.errstate(invalid="ignore"):
                out[f"{prefix}_loss_mean"] = float(pl.mean()) if len(pl) else float("nan")
                out[f"{prefix}_acc_mean"] = float(pa.mean()) if len(pa) else float("nan")
        out[f"{name}_agent_loss"], out[f"{name}_agent_acc"] = loss.T.astype(np.float32), acc.T.astype(np.float32)
        with np.errstate(invalid="ignore"):
            out[f"{name}_loss_mean"] = loss.mean(axis=0) if len(loss) else np.full(K, np.nan)
            out[f"{name}_acc_mean"] = acc.mean(axis=0) if len(acc) else np.full(K, np.nan)
    return out

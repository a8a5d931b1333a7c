"""One round of the ν-step FedAvg variant and the personalized evaluation, for one block of agents.

A round is :func:`local_round` on every rank (the block's exactly-summed contribution as int64)
followed by :func:`aggregate`, the server step (one Allreduce through dist, decode, new global
model). The global model is a flat tensor w (d,) (layout.py). Evaluation returns per-agent rows
the caller gathers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.profiler import record_function

from mpifedmeta.core import exactsum, metagrad, rng
from mpifedmeta.engine import chunks
from mpifedmeta.parallel import dist
from mpifedmeta.federation.block import AgentBlock, padded_rows


@dataclass(frozen=True)
class RoundSpec:
    """The training hyper-parameters a round needs (plain values, no config object)."""
    seed: int
    local_steps: int
    beta: float
    batch_size: int | str
    meta: metagrad.MetaSpec
    capture: str = "off"        # whole-local-round capture: off | compile | cudagraphs
    agent_chunk: int = 0        # agents per batched call, last chunk padded (0 = the whole block at once)


def cohort_weights(cohort: np.ndarray, train_counts, weighting: str) -> np.ndarray:
    """Integer weights c_i of the cohort's agents (uniform: 1, samples: n_i), identical on every
    rank; the average is Σ c_i·θ_i / Σ c_i."""
    if weighting == "uniform":
        return np.ones(len(cohort), dtype=np.int64)
    return np.asarray(train_counts[cohort], dtype=np.int64)


@dataclass
class BlockSums:
    """A block's exact contribution to a round: int64 sums of the scaled displacements (d,), of the
    weighted meta-losses (2 limbs), and how many of its chunks had a local model leave the range."""
    displacements: torch.Tensor
    loss: torch.Tensor
    bad: torch.Tensor


def round_batches(block: AgentBlock, spec: RoundSpec, round_: int, ids: torch.Tensor,
                  positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample indices (B, τ, slots, b) into the block's training tensors and their mask."""
    tau = spec.local_steps
    if spec.batch_size == "full":
        idx, mask = padded_rows(block.train_offset, block.train_count, positions, block.train_width)
        shape = (idx.shape[0], tau, 1, idx.shape[1])
        return idx[:, None, None, :].expand(shape), mask[:, None, None, :].expand(shape).to(block.X_train.dtype)
    slots = metagrad.num_slots(spec.meta.nu, spec.meta.method)
    pos = rng.batch_indices(spec.seed, round_, ids, block.train_count[positions], tau, slots, spec.batch_size)
    idx = block.train_offset[positions].view(-1, 1, 1, 1) + pos
    return idx, torch.ones(idx.shape, dtype=block.X_train.dtype, device=idx.device)


def local_round(backend, block: AgentBlock, w: torch.Tensor, spec: RoundSpec, round_: int,
                cohort: np.ndarray, weights: np.ndarray) -> BlockSums:
    """Run the τ local meta-steps of this block's sampled agents; return their exact sums.

    ``w``: the flat global model (d,); ``weights``: the cohort's integer weights c_i
    (:func:`cohort_weights`). Agents of other blocks contribute nothing. The agents go through
    the backend in chunks (chunks.each) of ``spec.agent_chunk``; results stay on the device.
    """
    dev, d = block.device, w.numel()
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
    loss_terms = []
    for a, b, (i,), (m,) in chunks.each(B, spec.agent_chunk, (idx,), (mask,)):
        with record_function("mpifedmeta.local_update"):
            theta, losses = metagrad.local_update(backend, chunks.broadcast(w, i.shape[0]), block.X_train,
                                                  block.Y_train, i, m, spec.meta, spec.beta, spec.capture)
        with record_function("mpifedmeta.exact_sum"):
            q, bad = exactsum.encode_displacements(theta[:b - a], w, scale[a:b].to(w.dtype))
        sums.displacements += q
        sums.bad += bad
        loss_terms.append(losses[:b - a].to(torch.float64).mean(dim=1) * p[a:b])
    sums.loss = exactsum.encode_sum(torch.cat(loss_terms).unsqueeze(1))
    return sums


def aggregate(world: dist.World, stage: dist.HostStage, sums: BlockSums, flags: list[int], w: torch.Tensor,
              total_weight: int) -> tuple[torch.Tensor | None, float, list[int], dict]:
    """The FedAvg server step: one SUM Allreduce of [the ranks' sums, bad count, ``flags``], then decode.

    ``flags`` are host ints (e.g. a stop request) summed alongside; the device values reach the
    host in one copy into ``stage``'s reused buffer. Returns (the new flat global model, typed and
    placed like ``w`` — None when a local model left the range anywhere —, the weighted mean
    meta-loss (nan then), the summed [bad chunks, *flags], {"allreduce_time", "bytes_allreduced"}).
    """
    t0 = time.perf_counter()
    local = torch.cat([sums.displacements, sums.loss.reshape(-1), sums.bad.reshape(1)])
    with record_function("mpifedmeta.allreduce"):
        buf = stage.allreduce(world, local, np.asarray(flags, dtype=np.int64))
    timings = {"allreduce_time": time.perf_counter() - t0, "bytes_allreduced": buf.nbytes}
    d, n = w.numel(), 1 + len(flags)
    summed = [int(v) for v in buf[-n:]]
    if summed[0]:
        return None, float("nan"), summed, timings
    w64 = w.detach().to(torch.float64).cpu().numpy()
    new = exactsum.decode_displacements(buf[:d], w64, exactsum.grid_bits(total_weight), total_weight)
    if not np.all(np.abs(new) < exactsum.LIMIT):
        summed[0] = int(np.sum(~(np.abs(new) < exactsum.LIMIT)))
        return None, float("nan"), summed, timings
    meta_loss = float(exactsum.decode(buf[d:d + 2].reshape(2, 1))[0])
    return torch.as_tensor(new, dtype=w.dtype).to(w.device), meta_loss, summed, timings


def _eval_chunk(agent_chunk: int, chunk: int) -> tuple[int, bool]:
    """Agents per evaluation call and whether the calls are padded to exactly that many."""
    return (agent_chunk, True) if agent_chunk else (chunk, False)


def evaluate_block(backend, block: AgentBlock, w: torch.Tensor, agent_ids: np.ndarray,
                   ks: list[int], alpha: float, chunk: int, agent_chunk: int = 0) -> np.ndarray:
    """Personalized test loss/accuracy of this block's agents among ``agent_ids``.

    Returns rows [agent id, loss_k for k in ks…, acc_k for k in ks…] (float64) for the agents
    this block owns, fine-tuned with k full-batch steps of size α on their own training split.
    Batched ``chunk`` agents per call, or exactly ``agent_chunk`` when > 0 (padded, dummies dropped).
    """
    held, pos = block.locate(agent_ids)
    mine = agent_ids[held]
    if len(mine) == 0:
        return np.zeros((0, 1 + 2 * len(ks)))
    pos = torch.as_tensor(pos, device=block.device)
    dt = block.X_train.dtype
    tr_idx, tr_mask = padded_rows(block.train_offset, block.train_count, pos, block.train_width)
    te_idx, te_mask = padded_rows(block.test_offset, block.test_count, pos, block.test_width)
    size, fixed = _eval_chunk(agent_chunk, chunk)
    losses, accs = [], []
    for a, b, (tri, tei), (trm, tem) in chunks.each(len(mine), size, (tr_idx, te_idx), (tr_mask.to(dt), te_mask.to(dt)),
                                                    fixed):
        loss, acc = metagrad.personalized_metrics(backend, w, metagrad.Split(block.X_train, block.Y_train, tri, trm),
                                                  metagrad.Split(block.X_test, block.Y_test, tei, tem), ks, alpha)
        losses.append(loss[:b - a])
        accs.append(acc[:b - a])
    return np.concatenate([mine[:, None].astype(np.float64), torch.cat(losses).double().cpu().numpy(),
                           torch.cat(accs).double().cpu().numpy()], axis=1)


def stationarity_block(backend, block: AgentBlock, w: torch.Tensor, num_train: int, nu: int, alpha: float,
                       chunk: int, agent_chunk: int = 0) -> torch.Tensor:
    """The block's exact share of [∇F(w), F(w)] with F = (1/N) Σ_i f_i(θ_i^ν) over the N training
    agents, full local training data, exact meta-gradient. Returns int64 limbs (2, d + 1).
    Batched ``chunk`` agents per call, or exactly ``agent_chunk`` when > 0 (padded, dummies dropped)."""
    total = torch.zeros(2, w.numel() + 1, dtype=torch.int64, device=block.device)
    training = torch.as_tensor(np.flatnonzero(block.global_ids() < num_train), device=block.device)
    idx, mask = padded_rows(block.train_offset, block.train_count, training, block.train_width)
    size, fixed = _eval_chunk(agent_chunk, chunk)
    for a, b, (i,), (m,) in chunks.each(len(training), size, (idx,), (mask.to(block.X_train.dtype),), fixed):
        theta = backend.layout.views(chunks.broadcast(w, i.shape[0]))
        g, value = metagrad.block_meta_gradients(backend, theta, block.X_train, block.Y_train,
                                                 i[:, None, :], m[:, None, :], metagrad.MetaSpec(nu, alpha, "exact"))
        terms = torch.cat([t[:b - a].reshape(b - a, -1).to(torch.float64) for t in g]
                          + [value[:b - a].to(torch.float64)[:, None]], dim=1)
        total += exactsum.encode_sum(terms / num_train)
    return total

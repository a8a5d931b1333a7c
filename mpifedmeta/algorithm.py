"""One round of the ν-step FedAvg variant and the personalized evaluation, for one block of agents.

A round is :func:`local_round` on every rank (the block's exactly-summed contribution as int64
limbs) followed by :func:`aggregate`, the server step (one Allreduce through dist, decode, new
global model). Evaluation returns per-agent rows the caller gathers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from . import chunks, dist, exactsum, metagrad, rng
from .block import AgentBlock, padded_rows
from .models import flatten, unflatten


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


def aggregation_weights(cohort: np.ndarray, train_counts: np.ndarray, weighting: str) -> np.ndarray:
    """Normalised weights p_i (Σ p_i = 1) of the cohort's agents, identical on every rank."""
    w = np.ones(len(cohort)) if weighting == "uniform" else train_counts[cohort].astype(np.float64)
    return w / w.sum()


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


def local_round(backend, block: AgentBlock, global_params: dict, spec: RoundSpec, round_: int,
                cohort: np.ndarray, weights: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the τ local meta-steps of this block's sampled agents; return their weighted sum.

    Returns (int64 limbs (2, d + 1) = exact Σ_i p_i·[θ_i, mean_t meta-loss_i], 0-dim int64 count of
    terms out of the representable range), both on the block's device (no host synchronisation).
    Agents of other blocks contribute nothing. With ``spec.agent_chunk`` = C > 0 the agents go
    through the backend in chunks of exactly C (the last one padded with dummy agents, dropped),
    so that every call has the same shape whatever the number of ranks.
    """
    mine, positions = block.locate(cohort)
    d = sum(p.numel() for p in global_params.values())
    dev = block.device
    if not mine.any():
        return (torch.zeros(2, d + 1, dtype=torch.int64, device=dev), torch.zeros((), dtype=torch.int64, device=dev))
    B = int(mine.sum())
    # ids, positions in the block and weights (float64 bits as int64) go to the device in one copy
    packed = torch.from_numpy(np.concatenate([cohort[mine].astype(np.int64), positions.astype(np.int64),
                                              weights[mine].astype(np.float64).view(np.int64)])).to(dev)
    ids, positions, p = packed[:B], packed[B:2 * B], packed[2 * B:].view(torch.float64)
    idx, mask = round_batches(block, spec, round_, ids, positions)
    C = spec.agent_chunk
    flat, losses = [], []
    for a, b in chunks.spans(B, C):
        i, m = (chunks.pad(idx[a:b], C), chunks.pad(mask[a:b], C, 0.0)) if C else (idx[a:b], mask[a:b])
        n = i.shape[0]
        stacked = {k: v.unsqueeze(0).expand((n,) + v.shape).clone() for k, v in global_params.items()}
        params, loss_c = metagrad.local_update(backend, stacked, block.X_train, block.Y_train, i, m,
                                               spec.meta, spec.beta, spec.capture)
        flat.append(flatten(params, batch_dims=1)[:b - a])
        losses.append(loss_c[:b - a])
    flat, losses = (flat[0], losses[0]) if len(flat) == 1 else (torch.cat(flat), torch.cat(losses))
    terms = p.unsqueeze(1) * torch.cat([flat.to(torch.float64),
                                        losses.to(torch.float64).mean(dim=1, keepdim=True)], dim=1)
    return exactsum.encode_sum(terms), exactsum.count_out_of_range(terms)


def aggregate(world: dist.World, stage: dist.HostStage, limbs: torch.Tensor, bad: torch.Tensor,
              flags: list[int], like: dict) -> tuple[dict | None, float, list[int], dict]:
    """The FedAvg server step: one SUM Allreduce of [this rank's limbs, ``bad``, ``flags``], then decode.

    ``bad`` (0-dim device tensor) counts this rank's out-of-range terms (from :func:`local_round`);
    ``flags`` are host ints (e.g. a stop request) summed alongside. The device values reach the
    host in one copy into ``stage``'s reused buffer. Returns (new global parameters shaped, typed
    and placed like ``like`` — None when any rank had out-of-range terms —, the weighted mean
    meta-loss (nan then), the summed [bad, *flags], {"allreduce_time", "bytes_allreduced"}).
    """
    t0 = time.perf_counter()
    buf = stage.allreduce(world, torch.cat([limbs.reshape(-1), bad.reshape(1).to(torch.int64)]),
                          np.asarray(flags, dtype=np.int64))
    timings = {"allreduce_time": time.perf_counter() - t0, "bytes_allreduced": buf.nbytes}
    n = 1 + len(flags)
    summed = [int(v) for v in buf[-n:]]
    if summed[0]:
        return None, float("nan"), summed, timings
    total = exactsum.decode(buf[:-n].reshape(2, -1))
    first = next(iter(like.values()))
    flat = torch.as_tensor(total[:-1], dtype=first.dtype, device=first.device)   # one host-to-device copy
    return unflatten(flat, like), float(total[-1]), summed, timings


def evaluate_block(backend, block: AgentBlock, global_params: dict, agent_ids: np.ndarray,
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
    tr_idx, tr_mask = padded_rows(block.train_offset, block.train_count, pos, block.train_width)
    te_idx, te_mask = padded_rows(block.test_offset, block.test_count, pos, block.test_width)
    if agent_chunk:
        tr_idx, te_idx = chunks.pad_to_multiple(tr_idx, agent_chunk), chunks.pad_to_multiple(te_idx, agent_chunk)
        tr_mask, te_mask = chunks.pad_to_multiple(tr_mask, agent_chunk, 0), chunks.pad_to_multiple(te_mask, agent_chunk, 0)
        chunk = agent_chunk
    dt = block.X_train.dtype
    losses, accs = metagrad.personalized_metrics(backend, global_params,
                                                 metagrad.Split(block.X_train, block.Y_train, tr_idx, tr_mask.to(dt)),
                                                 metagrad.Split(block.X_test, block.Y_test, te_idx, te_mask.to(dt)),
                                                 ks, alpha, chunk)
    n = len(mine)
    return np.concatenate([mine[:, None].astype(np.float64), losses[:n].double().cpu().numpy(),
                           accs[:n].double().cpu().numpy()], axis=1)


def stationarity_block(backend, block: AgentBlock, global_params: dict, num_train: int, nu: int, alpha: float,
                       chunk: int, agent_chunk: int = 0) -> torch.Tensor:
    """The block's exact share of [∇F(w), F(w)] with F = (1/N) Σ_i f_i(θ_i^ν) over the N training
    agents, full local training data, exact meta-gradient. Returns int64 limbs (2, d + 1).
    Batched ``chunk`` agents per call, or exactly ``agent_chunk`` when > 0 (padded, dummies dropped)."""
    d = sum(p.numel() for p in global_params.values())
    total = torch.zeros(2, d + 1, dtype=torch.int64, device=block.device)
    training = np.flatnonzero(block.global_ids() < num_train)
    step = agent_chunk or chunk
    for start in range(0, len(training), step):
        positions = torch.as_tensor(training[start:start + step], device=block.device)
        n = len(positions)
        idx, mask = padded_rows(block.train_offset, block.train_count, positions, block.train_width)
        if agent_chunk:
            idx, mask = chunks.pad(idx, agent_chunk), chunks.pad(mask, agent_chunk, 0)
        B = idx.shape[0]
        stacked = {k: v.unsqueeze(0).expand((B,) + v.shape).clone() for k, v in global_params.items()}
        g, value = metagrad.block_meta_gradients(backend, stacked, block.X_train, block.Y_train, idx[:, None, :],
                                                 mask[:, None, :].to(block.X_train.dtype),
                                                 metagrad.MetaSpec(nu, alpha, "exact"))
        terms = torch.cat([flatten(g, batch_dims=1)[:n].to(torch.float64), value[:n].to(torch.float64)[:, None]], dim=1)
        total += exactsum.encode_sum(terms / num_train)
    return total

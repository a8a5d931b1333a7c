"""How far the Hessian-free meta-gradient is from the exact one, per model and precision.

Usage: python configs/study/hf_accuracy.py [--agents 16] [--delta 1e-3]

For each model (linear = smooth softmax regression, mlp = ELU activations, cnn = ReLU + max-pool),
dtype and ν, computes both flavours on the same MNIST-5k batches for a block of agents at the
initial model and prints the median and max over agents of ‖g_hf − g_exact‖ / ‖g_exact‖.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from mpifedmeta.core import metagrad
from mpifedmeta.engine import backends
from mpifedmeta.data import load_dataset
from mpifedmeta.models import build_model, param_dict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=16)
    ap.add_argument("--delta", type=float, default=1e-3)
    ap.add_argument("--alpha", type=float, default=0.02)
    args = ap.parse_args()
    ds = load_dataset("mnist5k")
    print(f"HF vs exact meta-gradient, delta = {args.delta}, alpha = {args.alpha}, {args.agents} agents, batch 32, "
          "MNIST-5k, initial model")
    print(f"{'model':<8} {'dtype':<8} {'nu':>3} {'median rel. err':>16} {'max rel. err':>13}")
    for name in ("linear", "mlp", "cnn"):
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(0)
            model = build_model(name, tuple(ds.x.shape[1:]), 10, None).to(dtype)
            backend = backends.make(model, "stacked")
            X, Y = torch.as_tensor(ds.x, dtype=dtype), torch.as_tensor(ds.y)
            p = param_dict(model)
            B = args.agents
            stacked = {k: v.unsqueeze(0).repeat(B, *[1] * v.dim()) for k, v in p.items()}
            for nu in (1, 3):
                g = torch.Generator().manual_seed(nu)
                S = metagrad.num_slots(nu, "exact")
                idx = torch.randint(0, len(X), (B, S, 32), generator=g)
                mask = torch.ones(B, S, 32, dtype=dtype)
                ex, _ = metagrad.block_meta_gradients(backend, stacked, X, Y, idx, mask, metagrad.MetaSpec(nu, args.alpha, "exact"))
                hf, _ = metagrad.block_meta_gradients(backend, stacked, X, Y, idx, mask,
                                                      metagrad.MetaSpec(nu, args.alpha, "hf", args.delta))
                e = torch.cat([v.reshape(B, -1) for v in ex.values()], 1).double()
                h = torch.cat([v.reshape(B, -1) for v in hf.values()], 1).double()
                # the error of the Hessian term only: compare against the first-order part removed
                fo, _ = metagrad.block_meta_gradients(backend, stacked, X, Y, idx[:, :nu + 1], mask[:, :nu + 1],
                                                      metagrad.MetaSpec(nu, args.alpha, "fo"))
                f = torch.cat([v.reshape(B, -1) for v in fo.values()], 1).double()
                rel = ((h - e).norm(dim=1) / e.norm(dim=1)).numpy()
                rel_h = ((h - e).norm(dim=1) / (e - f).norm(dim=1).clamp_min(1e-300)).numpy()
                print(f"{name:<8} {str(dtype).split('.')[-1]:<8} {nu:>3} {np.median(rel):>16.2e} {rel.max():>13.2e}"
                      f"   (relative to the Hessian part: median {np.median(rel_h):.2e})")


if __name__ == "__main__":
    main()

"""Check the convex sanity case (configs/study/convex-digits.toml) against the convergence theory.

Usage: python configs/study/convex_analysis.py runs/study/convex/* runs/study/convex-beta/*

For multinomial logistic regression the Hessian of agent i's loss is
(1/n_i) Σ (diag(p) − p pᵀ) ⊗ x̃ x̃ᵀ with x̃ = [x, 1], and ‖diag(p) − p pᵀ‖ ≤ 1/2, so f_i is
L_i-smooth with L_i ≤ ½ λ_max((1/n_i) Σ x̃ x̃ᵀ). With one full-batch local step and every agent in
every round, one round is w ← w − β ∇F(w) (exact flavour): gradient descent on the ν-step
meta-objective, whose smoothness is at most L_F ≤ L (1 + αL)^{2ν} + (third-derivative terms), so
β < 2 / L_F guarantees descent and min_t ‖∇F(w_t)‖² = O(1/T). The first-order flavour follows a
biased direction and must stall at a floor of order (αL)² ‖∇f‖²; Hessian-free (δ = 1e-3, float64,
smooth model) must track the exact one.
"""

from __future__ import annotations

import json
import sys

import h5py
import numpy as np

from mpifedmeta.data import load_dataset


def smoothness(run_dir: str) -> tuple[float, float, dict]:
    """(max_i L_i, mean_i L_i, config) from the run's stored partition."""
    with h5py.File(f"{run_dir}/metrics.h5", "r") as f:
        cfg = json.loads(f.attrs["config"])
        ptr, idx = f["partition/train_ptr"][()], f["partition/train_idx"][()]
    ds = load_dataset(cfg["data"]["dataset"], cfg["data"]["path"])
    x = ds.x.reshape(len(ds.x), -1).astype(np.float64)
    Ls = []
    for a in range(len(ptr) - 1):
        xa = x[idx[ptr[a]:ptr[a + 1]]]
        xt = np.hstack([xa, np.ones((len(xa), 1))])
        Ls.append(0.5 * np.linalg.eigvalsh(xt.T @ xt / len(xt))[-1])
    return float(np.max(Ls)), float(np.mean(Ls)), cfg


def local_curvature(run_dir: str, iters: int = 30) -> float:
    """max_i λ_max(∇²f_i(w_0)) at the initial model, by power iteration with exact HVPs."""
    import torch

    from mpifedmeta.core import metagrad
    from mpifedmeta.models import build_model

    with h5py.File(f"{run_dir}/metrics.h5", "r") as f:
        cfg = json.loads(f.attrs["config"])
        ptr, idx = f["partition/train_ptr"][()], f["partition/train_idx"][()]
    with h5py.File(f"{run_dir}/checkpoints/round_000000.h5", "r") as f:
        w0 = {k: torch.as_tensor(v[()], dtype=torch.float64) for k, v in f["model"].items()}
    ds = load_dataset(cfg["data"]["dataset"], cfg["data"]["path"])
    model = build_model(cfg["model"]["name"], tuple(ds.x.shape[1:]), ds.num_classes, cfg["model"]["hidden"]).double()
    loss = metagrad.make_loss(model)
    X, Y = torch.as_tensor(ds.x, dtype=torch.float64), torch.as_tensor(ds.y)
    top = 0.0
    for a in range(len(ptr) - 1):
        rows = torch.as_tensor(idx[ptr[a]:ptr[a + 1]])
        x, y, m = X[rows], Y[rows], torch.ones(len(rows), dtype=torch.float64)
        v = {k: torch.randn_like(t) for k, t in w0.items()}
        lam = 0.0
        for _ in range(iters):
            n = torch.sqrt(sum((t * t).sum() for t in v.values()))
            v = {k: t / n for k, t in v.items()}
            hv = metagrad.hvp_exact(loss, w0, v, x, y, m)
            lam = float(sum((hv[k] * v[k]).sum() for k in v))
            v = hv
        top = max(top, lam)
    return top


def main(dirs: list[str]) -> None:
    L, L_mean, cfg = smoothness(dirs[0])
    L0 = local_curvature(dirs[0])
    alpha, nu = cfg["train"]["alpha"], cfg["train"]["nu"]
    LF = L * (1 + alpha * L) ** (2 * nu)
    print(f"smoothness of the agents' losses: max L_i = {L:.3f}, mean {L_mean:.3f}; alpha*L = {alpha * L:.3f} "
          f"(inner steps are stable for alpha <= 1/L = {1 / L:.3f})")
    print(f"meta-objective smoothness bound (without third-derivative terms): L_F <= L(1+alpha L)^(2nu) = {LF:.3f}"
          f" -> guaranteed descent for beta < 2/L_F = {2 / LF:.3f}")
    LF0 = L0 * (1 + alpha * L0) ** (2 * nu)
    print(f"measured curvature at the initial model: max_i lambda_max(Hessian f_i(w0)) = {L0:.3f} "
          f"-> L_F(w0) ~ {LF0:.3f}, 2/L_F(w0) = {2 / LF0:.3f}")
    print()
    print(f"{'run':<40} {'beta':>5} {'rounds':>6} {'|gradF|^2 first':>15} {'last':>11} {'min':>11} "
          f"{'F first':>9} {'F last':>9}  slope d log(min|gradF|^2)/d log t")
    for d in dirs:
        with h5py.File(f"{d}/metrics.h5", "r") as f:
            c = json.loads(f.attrs["config"])
            r = f["eval/round"][()]
            g = f["eval/grad_norm_sq"][()]
            F = f["eval/meta_loss_full"][()]
        ok = np.isfinite(g)
        r, g, F = r[ok], g[ok], F[ok]
        if len(g) < 3:
            print(f"{d:<40} {c['train']['beta']:>5} diverged or too short ({len(g)} evaluations)")
            continue
        best = np.minimum.accumulate(g)
        late = r >= max(r[-1] // 4, 1)
        slope = np.polyfit(np.log(r[late]), np.log(best[late]), 1)[0] if late.sum() >= 2 else float("nan")
        label = f"{c['train']['metagrad']} nu={c['train']['nu']}"
        print(f"{label + ' ' + d.rstrip('/').split('/')[-1]:<40} {c['train']['beta']:>5} {r[-1]:>6} {g[0]:>15.3e} "
              f"{g[-1]:>11.3e} {best[-1]:>11.3e} {F[0]:>9.4f} {F[-1]:>9.4f}  {slope:+.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])

"""The table of the privacy-utility study (configs/study/privacy.sh, docs/RESULTS.md): rows ν × ε, columns the
personalized test accuracy (%) of the training agents and of the holdout agents after the run, mean ± std over
seeds (of the mean over the evaluated agents), the noise multiplier z and the ε spent, s/round and the
training wall time.

Personalized accuracy: after k = ν fine-tuning steps from the final global model (FedAvg, ν = 0: k = 0 and
k = 1, "+ fine-tuning"). ε: "∞ (no DP)" = privacy unset; "∞ (clip only)" = clipping with z = 0; else the run's
privacy.target_epsilon (the ε spent, train/epsilon of the last round, is its own column). A run that stopped
before its last round (exit code 4, diverged) is not averaged: its cell says so.

Usage: python configs/study/privacy_table.py [--by KEY] DIR...   (DIRs are searched for metrics.h5)
  --by KEY: one row per value of SECTION.KEY or KEY (e.g. beta, clip: the tuning runs) besides ν and ε
"""
import math
import os
import sys
from collections import defaultdict

import numpy as np

from mpifedmeta.storage import metrics

INF_NONE, INF_CLIP = "∞ (no DP)", "∞ (clip only)"


def num(x) -> str:
    return f"{x:g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def read_runs(dirs: list[str]) -> list[str]:
    found = []
    for top in dirs:
        for root, _, files in os.walk(top):
            if "metrics.h5" in files:
                found.append(root)
    return sorted(found)


def eps_label(c: dict) -> tuple[tuple, str]:
    """(sort key: no DP, clip only, then ε from large to small, then given z; label) of a run's privacy setting."""
    p = c.get("privacy", {})
    if p.get("clip") is None:
        return (0, 0.0), INF_NONE
    if p.get("target_epsilon") is not None:
        return (2, -float(p["target_epsilon"])), num(p["target_epsilon"])
    z = float(p.get("noise_multiplier") or 0.0)
    return ((1, 0.0), INF_CLIP) if z == 0 else ((3, z), f"z={num(z)}")


def noise_multiplier(m) -> float | None:
    """z of a DP run (the attributes of metrics.h5 train/epsilon), None without DP."""
    import h5py
    with h5py.File(m.path, "r") as f:
        eps = f.get("train/epsilon")
        return None if eps is None else float(eps.attrs["privacy_noise_multiplier"])


def lookup(c: dict, key: str):
    if "." in key:
        sec, k = key.split(".", 1)
        return c.get(sec, {}).get(k)
    for sec in ("train", "privacy", "data", "model", "server", "eval"):
        if key in c.get(sec, {}):
            return c[sec][key]
    return None


def mean_std(v: list[float], scale: float = 100.0, fmt: str = "{:.1f}") -> str:
    v = [x for x in v if x is not None and math.isfinite(x)]
    if not v:
        return "—"
    a = scale * np.asarray(v)
    return (fmt + " ± " + fmt).format(a.mean(), a.std()) if len(a) > 1 else fmt.format(a[0])


def main(argv: list[str]) -> int:
    by = None
    if argv[:1] == ["--by"]:
        by, argv = argv[1], argv[2:]
    if not argv:
        print(__doc__)
        return 2
    cells = defaultdict(list)         # row -> [(train, holdout) or None]
    extra = defaultdict(list)         # row -> [(z, ε spent, median s/round, training wall s)]
    problems, seeds, n_runs, n_train_of = [], set(), 0, {}
    for d in read_runs(argv):
        m = metrics.read(d)
        c = m.config
        nu = int(c["train"]["nu"])
        eps_key, eps = eps_label(c)
        byval = num(lookup(c, by)) if by else ""
        done = m.rounds >= c["train"]["rounds"] and m.eval_round.size and m.eval_round[-1] == m.rounds
        if not done:
            problems.append(f"{d}: stopped at round {m.rounds} of {c['train']['rounds']} (diverged or unfinished)")
        n_runs += 1
        seeds.add(c["train"]["seed"])
        n_train_of[int(c["train"]["agents_per_round"])] = int(c["data"]["num_agents"]) - int(c["data"]["holdout_agents"])
        z = noise_multiplier(m)
        spent = float(m.train["epsilon"][-1]) if "epsilon" in m.train and len(m.train["epsilon"]) else math.inf
        for k in ([0, 1] if nu == 0 else [nu]):
            if k not in list(m.finetune_steps):
                continue
            label = ("FedAvg (k=0)" if k == 0 else "FedAvg + fine-tuning (k=1)") if nu == 0 else f"ν={nu} (k={nu})"
            row = (int(c["train"]["agents_per_round"]), nu, k, eps_key, eps, byval, label)
            j = m.k_index(k)
            cells[row].append((float(m.train_acc_mean[-1, j]), float(m.holdout_acc_mean[-1, j])) if done else None)
            extra[row].append((float(z) if z is not None else None, spent,
                               float(np.median(m.train["round_time"])) if m.rounds else math.nan, float(m.wall_time)))
    if not n_runs:
        print(f"no metrics.h5 under {' '.join(argv)}")
        return 2
    head = ["ν-step model (k fine-tuning steps)", "target ε"] + ([by] if by else []) + \
        ["z", "ε spent", "train acc", "holdout acc", "s/round", "training wall (s)"]
    print(f"Personalized test accuracy (%) after the run at k = ν fine-tuning steps, mean ± std over {len(seeds)} "
          "seed(s) of the mean over the 1000 + 1000 evaluated agents; z: noise multiplier (calibrated at start-up); "
          "ε spent: train/epsilon of the last round at δ = privacy.delta; s/round: median training time per round, "
          "mean over the row's runs; training wall: rounds only (no start-up, no evaluation), mean per run")
    cohort = None
    for row in sorted(cells, key=lambda r: (-r[0], r[1], r[2], r[3], float(r[5]) if r[5] else 0.0)):
        if row[0] != cohort:
            cohort = row[0]
            print(f"\nCohorts of m = {cohort} a round ({n_train_of[cohort]} training agents; q = m/N = "
                  f"{cohort / n_train_of[cohort]:.4g} under Poisson sampling):\n")
            print("| " + " | ".join(head) + " |")
            print("|---|---|" + ("---|" if by else "") + "---:|" * (len(head) - 2 - bool(by)))
        got, ex = cells[row], extra[row]
        ok = [v for v in got if v is not None]
        bad = len(got) - len(ok)
        mark = f" ({bad} of {len(got)} diverged)" if bad else ""
        zs = [x[0] for x in ex if x[0] is not None]
        spent = [x[1] for x in ex]
        cols = [row[6], row[4]] + ([row[5]] if by else [])
        cols += [f"{np.mean(zs):.3f}" if zs else "—",
                 "∞" if not all(math.isfinite(s) for s in spent) else f"{np.mean(spent):.2f}",
                 mean_std([v[0] for v in ok]) + mark, mean_std([v[1] for v in ok]) + mark,
                 f"{np.mean([x[2] for x in ex]):.3f}", f"{np.mean([x[3] for x in ex]):.1f}"]
        print("| " + " | ".join(cols) + " |")
    for p in problems:
        print(f"\nNOTE: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

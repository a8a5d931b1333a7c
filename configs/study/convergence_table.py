"""Convergence speed: mean over seeds of the training agents' personalized accuracy after k
fine-tuning steps at each evaluated round, per (nu, metagrad).

Usage: python convergence_table.py K DIRS...   (K an integer, or "nu" for k = the run's own nu)"""
import json
import sys
from collections import defaultdict

import h5py
import numpy as np

k_arg = sys.argv[1]
groups = defaultdict(list)
for d in sys.argv[2:]:
    with h5py.File(f"{d}/metrics.h5", "r") as f:
        c = json.loads(f.attrs["config"])
        ks = list(f["eval"].attrs["finetune_steps"])
        k_wanted = c["train"]["nu"] if k_arg == "nu" else int(k_arg)
        groups[(c["train"]["nu"], c["train"]["metagrad"])].append(
            (f["eval/round"][()], f["eval/train_acc_mean"][:, ks.index(k_wanted)]))
rounds = groups[next(iter(groups))][0][0]
print(f"training agents' accuracy (%) after k={k_arg} fine-tuning steps, mean over seeds, by round")
print("| nu, metagrad | " + " | ".join(f"r={r}" for r in rounds) + " |")
print("|---|" + "---:|" * len(rounds))
for (nu, mg), runs in sorted(groups.items()):
    acc = np.mean([a for _, a in runs], axis=0)
    print(f"| {nu}, {mg} | " + " | ".join(f"{100 * x:.1f}" for x in acc) + " |")

"""The table of the algorithms study (configs/study/algorithms.sh, docs/RESULTS.md): rows algorithm × server
optimizer, columns per partition: the personalized test accuracy (%) of the training agents and of the
holdout agents at the last round, mean ± std over seeds (of the mean over agents), then s/round and the
training wall time.

Personalized accuracy: for the nu-step family the accuracy after k = nu fine-tuning steps from the global
model (FedAvg, nu = 0: k = 1 "+ fine-tuning" and k = 0, and k = 5 as a reference: pFedMe, Ditto and FedRep
personalize a new agent with 5-10 full-batch steps of their own); for pFedMe, Ditto and FedRep the accuracy
of the algorithm's own personalized model (metrics.h5 eval/personal_acc_mean, eval/holdout_personal_acc_mean).
A run that stopped before its last round (exit code 4, diverged) is not averaged: its cell says so.

Usage: python configs/study/algorithms_table.py [--keys] DIR...   (DIRs are searched for metrics.h5)
  --keys: also label the rows with the algorithm's keys when they differ (for the tuning runs)
"""
import json
import math
import os
import sys
from collections import defaultdict

import numpy as np

from mpifedmeta.storage import metrics

NAMES = {"pfedme": "pFedMe", "ditto": "Ditto", "fedrep": "FedRep"}
KEY_SYMBOLS = {"pfedme": {"lam": "λ", "inner_steps": "K", "inner_lr": "η_p"},
               "ditto": {"lam": "λ", "personal_steps": "s", "personal_lr": "η_p"},
               "fedrep": {"head_steps": "head steps", "head_lr": "head lr"}}


def num(x) -> str:
    return f"{x:g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def partition_label(c: dict) -> str:
    d = c["data"]
    if d["partition"] == "shards":
        return f"shards ({d['classes_per_agent']} classes/agent)"
    if d["partition"] == "dirichlet":
        return f"Dirichlet({num(d['dirichlet_alpha'])})"
    return d["partition"]


def server_label(c: dict) -> str:
    s = c.get("server", {"optimizer": "sgd", "lr": 1.0})
    o = s["optimizer"]
    if o == "momentum":
        return f"momentum {num(s['momentum'])}, lr {num(s['lr'])}"
    if o in ("adam", "yogi"):
        return f"{o}, lr {num(s['lr'])}"
    return f"{o}, lr {num(s['lr'])}"


def rows_of(c: dict, with_keys: bool) -> list[tuple[str, tuple, str]]:
    """(algorithm label, sort key, what to read) of the rows a run contributes to: what = 'k=K' or 'personal'."""
    a = c.get("algorithm", {"name": "meta"})
    name, t = a["name"], c["train"]
    if name == "meta":
        nu, mg = t["nu"], t["metagrad"]
        if nu == 0:         # k=5: a reference with a personalization budget like the others' (see the module doc)
            return [("FedAvg + fine-tuning (k=1)", (0, 0), "k=1"), ("FedAvg (k=0)", (0, 1), "k=0"),
                    ("FedAvg + 5 fine-tuning steps (k=5)", (0, 2), "k=5")]
        label = f"Per-FedAvg, ν=1 {mg} (k=1)" if nu == 1 else f"ν={nu} {mg} (k={nu})"
        return [(label, (nu, ("exact", "fo", "hf").index(mg)), f"k={nu}")]
    label = NAMES.get(name, name)
    keys = [f"{sym}={num(a[k])}" for k, sym in KEY_SYMBOLS.get(name, {}).items() if a.get(k) is not None]
    if with_keys and keys:
        label += f" ({', '.join(keys)})"
    order = list(NAMES).index(name) if name in NAMES else len(NAMES)
    return [(label, (10 + order, tuple(num(a[k]) for k in sorted(a) if k != "name")), "personal")]


def read_runs(dirs: list[str]):
    found = []
    for top in dirs:
        for root, _, files in os.walk(top):
            if "metrics.h5" in files:
                found.append(root)
    return sorted(found)


def values(m, what: str) -> tuple[float, float]:
    """(training agents, holdout agents) accuracy at the last evaluated round."""
    if what == "personal":
        return float(m.personal["personal_acc_mean"][-1]), float(m.personal["holdout_personal_acc_mean"][-1])
    j = m.k_index(int(what[2:]))
    return float(m.train_acc_mean[-1, j]), float(m.holdout_acc_mean[-1, j])


def mean_std(v: list[float]) -> str:
    v = [x for x in v if math.isfinite(x)]
    if not v:
        return "—"
    a = 100 * np.asarray(v)
    return f"{a.mean():.1f} ± {a.std():.1f}" if len(a) > 1 else f"{a[0]:.1f}"


def main(argv: list[str]) -> int:
    with_keys = "--keys" in argv
    dirs = [a for a in argv if a != "--keys"]
    if not dirs:
        print(__doc__)
        return 2
    cells = defaultdict(list)          # (row, server, partition) -> [(train, holdout, run)]
    times = defaultdict(list)          # (row, server) -> [(median s/round, training wall s)] (one per run)
    rows, parts, problems, keys_used = {}, [], [], {}
    n_runs, seen = 0, set()
    for d in read_runs(dirs):
        m = metrics.read(d)
        c = m.config
        same = json.dumps({s: v for s, v in c.items() if s != "output"}, sort_keys=True)
        if same in seen:            # the same run twice (e.g. the sgd baseline of both tuning steps)
            continue
        seen.add(same)
        n_runs += 1
        part = partition_label(c)
        if part not in parts:
            parts.append(part)
            parts.sort(key=lambda p: (not p.startswith("shards"), p))
        done = m.rounds >= c["train"]["rounds"] and m.eval_round.size and m.eval_round[-1] == m.rounds
        if not done:
            problems.append(f"{d}: stopped at round {m.rounds} of {c['train']['rounds']} (diverged or unfinished)")
        a = c.get("algorithm", {"name": "meta"})
        if a["name"] in KEY_SYMBOLS:
            keys_used.setdefault(NAMES.get(a["name"], a["name"]), set()).add(", ".join(
                f"{sym}={num(a[k])}" for k, sym in KEY_SYMBOLS[a["name"]].items() if a.get(k) is not None) or "defaults")
        for label, order, what in rows_of(c, with_keys):
            srv = server_label(c)
            rows[(label, srv)] = (order, srv != "sgd, lr 1", srv)
            cells[(label, srv, part)].append(values(m, what) if done else None)
            if what in ("k=1", "personal") or (what == f"k={c['train']['nu']}" and c["train"]["nu"] > 0):
                times[(label, srv)].append((float(np.median(m.train["round_time"])), m.wall_time))
    if not n_runs:
        print(f"no metrics.h5 under {' '.join(dirs)}")
        return 2
    seeds = max(len(v) for v in cells.values())
    head = ["algorithm (personalized model)", "server"]
    for p in parts:
        head += [f"{p} train", f"{p} holdout"]
    head += ["s/round", "training wall (s)"]
    print(f"Personalized test accuracy (%) at the last round, mean ± std over {seeds} seed(s) of the mean over agents;"
          " s/round: median training time per round, mean over runs (both partitions);"
          " training wall: training time of all the row's runs together (rounds only, no evaluation or start-up)\n")
    print("| " + " | ".join(head) + " |")
    print("|---|---|" + "---:|" * (len(head) - 2))
    for (label, srv), _ in sorted(rows.items(), key=lambda kv: kv[1]):
        row = [label, srv]
        for p in parts:
            got = cells.get((label, srv, p), [])
            ok = [v for v in got if v is not None]
            bad = len(got) - len(ok)
            mark = f" ({bad} of {len(got)} diverged)" if bad else ""
            row += [mean_std([v[0] for v in ok]) + mark, mean_std([v[1] for v in ok]) + mark]
        t = times.get((label, srv)) or times.get(("FedAvg + fine-tuning (k=1)", srv), []) if label.startswith(
            "FedAvg") else times.get((label, srv), [])
        wall = sum(x[1] for x in t)
        row += [f"{np.mean([x[0] for x in t]):.3f}" if t else "—",
                (f"{wall:.0f}" if wall >= 10 else f"{wall:.1f}") if t else "—"]
        print("| " + " | ".join(row) + " |")
    if not with_keys and keys_used:
        print("\nKeys: " + "; ".join(f"{n} {', '.join(sorted(k))}" for n, k in keys_used.items()))
    for p in problems:
        print(f"\nNOTE: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

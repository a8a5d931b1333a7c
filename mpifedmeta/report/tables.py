"""The Markdown side of the report: the per-run summary table and the table aggregated over seeds.

Accuracies are stored as fractions in [0, 1] and shown as percentages.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from mpifedmeta.run.config import keys_where
from mpifedmeta.storage.results import RunMetrics

DASH = "\u2013"  # shown for missing values (no holdout agents, k not evaluated, ...)
# Config keys that do not define an experiment (seeds are aggregated over, the rest is bookkeeping).
_NOT_EXPERIMENT = keys_where("experiment", False)


def fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _fmt_duration(s: float) -> str:
    if not math.isfinite(s):
        return DASH
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        m, sec = divmod(int(round(s)), 60)
        return f"{m}m {sec:02d}s"
    h, rem = divmod(int(round(s)), 3600)
    return f"{h}h {rem // 60:02d}m"


def finite(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


def _acc_cell(mean: float, per_agent: np.ndarray) -> str:
    if not math.isfinite(mean):
        return DASH
    vals = finite(per_agent)
    if vals.size == 0:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * float(np.std(vals)):.1f}"


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def summary(runs, labels, ks, images: list[str]) -> str:
    head = ["run", "rounds", "eval round"]
    for k in ks:
        head += [f"train acc k={k} (%)", f"holdout acc k={k} (%)"]
    personal = any(r.has_personal for r in runs)
    if personal:
        head += ["train acc, own model (%)", "holdout acc, own model (%)"]
    head.append("wall time")
    lines = [
        "# mpifedmeta report",
        "",
        "Personalized test accuracy after k fine-tuning steps at each run's last evaluated round:",
        "mean over agents ± standard deviation over agents (training agents / holdout agents);",
        "\"own model\": the algorithm's personalized model (pFedMe, Ditto, FedRep), where it has one.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for run, label in zip(runs, labels):
        row = [_md_escape(label), str(run.rounds), DASH if run.final_eval_round is None else str(run.final_eval_round)]
        for k in ks:
            j = run.k_index(k)
            if j is None or run.eval_round.size == 0:
                row += [DASH, DASH]
                continue
            row.append(_acc_cell(float(run.train_acc_mean[-1, j]), run.final_train_agent_acc[j]))
            row.append(_acc_cell(float(run.holdout_acc_mean[-1, j]), run.final_holdout_agent_acc[j]))
        if personal:
            if run.has_personal and run.eval_round.size:
                p = run.personal
                row.append(_acc_cell(float(p["personal_acc_mean"][-1]), p["final_personal_agent_acc"]))
                row.append(_acc_cell(float(p["holdout_personal_acc_mean"][-1]), p["final_holdout_personal_agent_acc"]))
            else:
                row += [DASH, DASH]
        row.append(_fmt_duration(run.wall_time))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Runs", ""]
    for run, label in zip(runs, labels):
        extra = []
        if "strategy" in run.attrs:
            extra.append(f"strategy `{run.attrs['strategy']}`")
        if "num_params" in run.attrs:
            extra.append(f"{run.attrs['num_params']} parameters")
        extra.append(f"{run.train_agent_ids.size} training agents evaluated, {run.num_holdout} holdout agents")
        lines.append(f"- **{_md_escape(label)}**: `{run.path}` ({', '.join(extra)})")
    lines += ["", "## Plots", ""]
    for name in images:
        lines += [f"![{os.path.splitext(name)[0]}]({name})", ""]
    return "\n".join(lines)


def _experiment_key(config: dict) -> str:
    reduced = {sec: {k: v for k, v in vals.items() if k not in _NOT_EXPERIMENT.get(sec, ())}
               for sec, vals in config.items() if isinstance(vals, dict)}
    return json.dumps(reduced, sort_keys=True)


def experiment_groups(runs: list[RunMetrics]) -> list[tuple[str, list[RunMetrics]]]:
    """Runs grouped by configuration apart from the seed; each group labelled by the keys that
    differ between groups (e.g. ``nu=3 metagrad=hf``). Order of first appearance."""
    order: dict[str, list[RunMetrics]] = {}
    for r in runs:
        order.setdefault(_experiment_key(r.config), []).append(r)
    configs = [json.loads(k) for k in order]
    varying = []
    for sec in sorted({s for c in configs for s in c}):
        for k in sorted({k for c in configs for k in c.get(sec, {})}):
            if len({json.dumps(c.get(sec, {}).get(k)) for c in configs}) > 1:
                varying.append((sec, k))
    out = []
    for key, members in order.items():
        c = json.loads(key)
        label = " ".join(f"{k}={fmt_value(c.get(sec, {}).get(k))}" for sec, k in varying) or "all runs"
        out.append((label, members))
    return out


def _mean_std(values: list[float]) -> str:
    v = np.array([x for x in values if math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return DASH
    return f"{100 * v.mean():.1f} ± {100 * v.std():.1f}" if v.size > 1 else f"{100 * v[0]:.1f}"


def seed_table(groups, ks) -> str:
    """Final personalized accuracy per experiment: mean ± std over seeds of the agents' mean."""
    personal = any(r.has_personal for _, members in groups for r in members)
    head = ["experiment", "seeds"] + [f"train k={k}" for k in ks] + [f"holdout k={k}" for k in ks] + \
        (["train, own model", "holdout, own model"] if personal else []) + ["s/round"]
    lines = ["## Aggregated over seeds", "",
             "Personalized test accuracy (%) at the last evaluated round after k fine-tuning steps: mean ± std over "
             "seeds of the mean over agents; s/round = median training time per round, mean over seeds.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for label, members in groups:
        row = [_md_escape(label), str(len(members))]
        for what in ("train_acc_mean", "holdout_acc_mean"):
            for k in ks:
                vals = []
                for r in members:
                    j = r.k_index(k)
                    if j is not None and r.eval_round.size:
                        vals.append(float(getattr(r, what)[-1, j]))
                row.append(_mean_std(vals))
        if personal:
            for what in ("personal_acc_mean", "holdout_personal_acc_mean"):
                row.append(_mean_std([float(r.personal[what][-1]) for r in members
                                      if r.has_personal and r.eval_round.size]))
        times = [float(np.median(r.train["round_time"])) for r in members
                 if "round_time" in r.train and r.train["round_time"].size]
        row.append(f"{np.mean(times):.3f}" if times else DASH)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"

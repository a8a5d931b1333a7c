"""Are runs bit-identical? Compares the final checkpoint and the metrics tables of every run
directory with the first one, bit for bit (timings excluded), and prints one line per run.

    python benchmarks/compare_runs.py runs/P1 runs/P2 runs/P3      # exit 0 = all identical, 1 = not

Used by benchmarks/gpu_check.sh for the P = 1, 2, 3 (and P = 1 twice) quickstart runs.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mpifedmeta.storage import checkpoint, hdf5, metrics  # noqa: E402


def is_timing(column: str) -> bool:
    """Measured times (wall_time, round_time, allreduce_time, compute_time, ...) differ between runs by nature."""
    return "time" in column


def identical(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bits (NaN == NaN)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def load(out: str):
    ckpts = checkpoint.list_all(out)
    if not ckpts:
        raise hdf5.OutputError(f"{out}: no checkpoints")
    round_, params, _, _ = checkpoint.read(ckpts[-1][1])
    tables = {f"{g}/{k}": v for g in ("train", "eval") for k, v in metrics.read(out, tables=True).tables[g].items() if not is_timing(k)}
    return round_, params, tables


def differences(ref, other) -> list[str]:
    (r1, p1, t1), (r2, p2, t2) = ref, other
    diffs = [] if r1 == r2 else [f"final round {r1} vs {r2}"]
    for name in sorted(set(p1) | set(p2)):
        if name not in p1 or name not in p2 or not identical(p1[name], p2[name]):
            d = (np.max(np.abs(p1[name].astype(np.float64) - p2[name].astype(np.float64)))
                 if name in p1 and name in p2 and p1[name].shape == p2[name].shape else float("nan"))
            diffs.append(f"model/{name} (max |diff| {d:.3g})")
    diffs += [name for name in sorted(set(t1) | set(t2)) if name not in t1 or name not in t2 or not identical(t1[name], t2[name])]
    return diffs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run output directories; the first is the reference")
    args = ap.parse_args(argv)
    try:
        runs = [load(r) for r in args.runs]
    except hdf5.OutputError as e:
        print(f"compare_runs: error: {e}", file=sys.stderr)
        return 2
    ok = True
    for path, run in zip(args.runs[1:], runs[1:]):
        diffs = differences(runs[0], run)
        ok &= not diffs
        print(f"{path} vs {args.runs[0]}: " + ("bit-identical (final checkpoint of round "
              f"{run[0]}, {len(run[1])} parameters, {len(run[2])} metrics datasets)" if not diffs
              else f"DIFFERENT: {', '.join(diffs[:8])}"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

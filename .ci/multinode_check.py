"""Checks for .ci/multinode.sh (python + h5py):

    multinode_check.py rounds OUT R               rounds 1..R exactly once in metrics.h5, latest checkpoint round R
    multinode_check.py calib OUT                  median seconds per round (train/round_time)
    multinode_check.py payload OUT                bytes the ranks put into Allreduce over the run (train/bytes_allreduced)
    multinode_check.py info LOG RANKS PER_NODE    `mpifedmeta info` lines in LOG: RANKS ranks on node1 and node2,
                                                  PER_NODE on each, node-local ranks 0..PER_NODE-1 on each
    multinode_check.py traffic BYTES SECONDS IDLE_RATE PAYLOAD
                                                  BYTES on node2's veth in SECONDS: more than the payload and
                                                  far above the idle rate
"""

from __future__ import annotations

import json
import os
import re
import sys

import h5py
import numpy as np


def _latest(out: str) -> str:
    names = sorted(n for n in os.listdir(os.path.join(out, "checkpoints")) if n.startswith("round_") and n.endswith(".h5"))
    return os.path.join(out, "checkpoints", names[-1])


def rounds(out: str, want: str) -> bool:
    want_n = int(want)
    with h5py.File(os.path.join(out, "metrics.h5"), "r") as f:
        r = f["train/round"][()]
        ranks = f.attrs.get("world_size_at_start", "?")
        nu = json.loads(f.attrs["config"])["train"]["nu"]
    with h5py.File(_latest(out), "r") as f:
        ck = int(f.attrs["round"])
    ok = np.array_equal(r, np.arange(1, want_n + 1)) and ck == want_n
    dup = len(r) - len(np.unique(r))
    print(f"  {out}: {len(r)} train rows ({dup} duplicated), rounds {r[0] if len(r) else '-'}..{r[-1] if len(r) else '-'}, "
          f"latest checkpoint round {ck}, nu={nu}, {ranks} rank(s) at start" + ("" if ok else f"  <- expected 1..{want_n}"))
    return ok


def calib(out: str) -> bool:
    with h5py.File(os.path.join(out, "metrics.h5"), "r") as f:
        t = f["train/round_time"][()]
    print(float(np.median(t[2:] if len(t) > 4 else t)))
    return True


def payload(out: str) -> bool:
    with h5py.File(os.path.join(out, "metrics.h5"), "r") as f:
        print(int(np.sum(f["train/bytes_allreduced"][()])))
    return True


LINE = re.compile(r"^rank +(\d+) +host (\S+) +local rank (\d+)/(\d+) +device (\S+)")


def info(log: str, nranks: str, per_node: str) -> bool:
    n, ppn = int(nranks), int(per_node)
    seen = {}
    for line in open(log, errors="replace"):
        m = LINE.match(line.strip())
        if m:
            seen[int(m.group(1))] = (m.group(2), int(m.group(3)), int(m.group(4)), m.group(5))
    hosts: dict[str, list] = {}
    for rank, (host, lr, ls, dev) in sorted(seen.items()):
        hosts.setdefault(host, []).append((rank, lr, ls))
    print("  info: " + "; ".join(f"{h}: " + ", ".join(f"rank {r} local {lr}/{ls}" for r, lr, ls in v)
                                 for h, v in sorted(hosts.items())))
    ok = sorted(seen) == list(range(n)) and sorted(hosts) == ["node1", "node2"]
    for h, v in hosts.items():
        ok = ok and sorted(lr for _, lr, _ in v) == list(range(ppn)) and all(ls == ppn for _, _, ls in v)
    if not ok:
        print(f"  info: expected {n} ranks, {ppn} per node on node1 and node2, node-local ranks 0..{ppn - 1} on each")
    return ok


def traffic(nbytes: str, seconds: str, idle_rate: str, pay: str) -> bool:
    b, s, idle, p = int(nbytes), max(float(seconds), 1e-3), float(idle_rate), int(pay)
    idle_expect = idle * s
    ok = b >= p and b >= 20 * max(idle_expect, 1000)
    print(f"  node2's veth carried {b / 1e6:.2f} MB (rx+tx) in {s:.1f} s; the ranks' Allreduce payload was "
          f"{p / 1e6:.2f} MB; idle traffic {idle:.0f} B/s would give {idle_expect / 1e3:.1f} kB"
          + ("" if ok else "  <- expected at least the payload and 20x the idle traffic"))
    return ok


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    sys.exit(0 if {"rounds": rounds, "calib": calib, "payload": payload, "info": info,
                   "traffic": traffic}[mode](*args) else 1)

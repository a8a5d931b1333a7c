#!/usr/bin/env bash
# The quiet run behind benchmarks/README.md: the four scripts that judge the performance targets, one after
# the other, each one's printed output kept in benchmarks/results/NAME.txt (beside the NAME.json it writes),
# then the targets table and those outputs written into benchmarks/README.md. Run it on an idle machine
# (about 6 minutes on 2 cores). It overwrites the results it names.
set -euo pipefail
cd "$(dirname "$0")/.."
for name in peers throughput roofline busy_node; do
  echo "== benchmarks/$name.py (load average $(cut -d' ' -f1 /proc/loadavg))"
  python "benchmarks/$name.py" | tee "benchmarks/results/$name.txt"
done
python benchmarks/targets.py --write-readme

#!/usr/bin/env bash
# The demo behind docs/RESULTS.md ("The demo"): Fashion-MNIST end to end on a CPU.
# Fetches the data (Debian's dataset-fashion-mnist, else the canonical download), prepares it
# into data/fashion-mnist, trains, evaluates, draws the figures and writes
# runs/demo/report.md and runs/demo/results.json. Rerunning reuses the data and a finished
# training; add --retrain to train again. Extra arguments go to `alexnet demo`.
set -euo pipefail
uptime  # the load average, reported beside the wall time
exec alexnet demo --out runs/demo --data data/fashion-mnist --seed 0 "$@"

#!/usr/bin/env bash
# The experiments behind docs/RESULTS.md: the paper's Figure 1 (PAPER E4) and the ablations
# (E3, B4, B5, C1, A12) at small scale on Fashion-MNIST. Each writes a Markdown table, a
# JSON file and a PNG under runs/experiments/; finished runs are reused on a rerun.
# CIFAR-10 instead: `alexnet prepare cifar10 data/cifar10 --source cifar-10-python.tar.gz`,
# then DATA=data/cifar10 (Figure 1's threshold becomes the paper's 25%).
set -euo pipefail
DATA=${DATA:-data/fashion-mnist}
[ -f "$DATA/meta.json" ] || alexnet prepare fashion-mnist "$DATA"  # add --download without apt
uptime
alexnet experiment fig1 --data "$DATA" --out runs/experiments/fig1 \
    --seeds 3 --epochs 3 --lrs 0.01 0.03 0.1 --train-images 20000
alexnet experiment ablations --data "$DATA" --out runs/experiments/ablations \
    --seeds 3 --epochs 8 --train-images 10000
# The same variants where the net can over-fit: 2,500 images, 30 epochs (about the same steps).
alexnet experiment ablations --data "$DATA" --out runs/experiments/ablations-2500 \
    --seeds 3 --epochs 30 --train-images 2500

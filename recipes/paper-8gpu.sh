#!/usr/bin/env bash
# The same run on the eight GPUs of one machine (DDP, NCCL). The global batch stays 128
# (16 per GPU), so the result is the one-GPU recipe's, only faster.
set -euo pipefail
DATA=${DATA:-data/imagenet}
exec torchrun --standalone --nproc-per-node 8 -m alexnet train \
    --data "$DATA" --preset paper --workers 6 "$@"

#!/usr/bin/env bash
# Several machines with 8 GPUs each. Run this on every node with the same MASTER (host name
# or address of node 0), NNODES and a port open between the nodes. Every node needs the
# prepared data at DATA; only global rank 0 writes the run directory (put --out on a disk
# node 0 can write). The global batch stays 128 unless you pass --batch-size.
set -euo pipefail
DATA=${DATA:-data/imagenet}
MASTER=${MASTER:?set MASTER to node 0\'s address}
NNODES=${NNODES:-2}
PORT=${PORT:-29500}
exec torchrun --nnodes "$NNODES" --nproc-per-node 8 \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER:$PORT" --rdzv-id alexnet \
    -m alexnet train --data "$DATA" --preset paper --workers 6 "$@"

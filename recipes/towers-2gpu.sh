#!/usr/bin/env bash
# The paper's two-GPU layout as model parallelism (PAPER A12): each GPU holds half of every
# layer; activations cross only at conv3 and the FC layers. One process, two GPUs.
set -euo pipefail
DATA=${DATA:-data/imagenet}
exec alexnet train --data "$DATA" --preset paper --towers cuda:0,cuda:1 --workers 8 "$@"

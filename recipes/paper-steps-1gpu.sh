#!/usr/bin/env bash
# The schedule of the authors' log (PAPER H1): lr 0.01, divided by 10 after epochs 25, 51
# and 79, stop after 91. Add `--set optim.bias_decay=false --set optim.bias_lr_mult=2` for
# the authors' code's bias treatment (no weight decay, twice the rate).
set -euo pipefail
DATA=${DATA:-data/imagenet}
exec alexnet train --data "$DATA" --preset paper-steps --workers 8 "$@"

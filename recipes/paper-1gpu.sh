#!/usr/bin/env bash
# The paper's recipe (PAPER D1-D5) on one GPU: batch 128, SGD momentum 0.9, weight decay
# 0.0005 in the paper's update form, lr 0.01 divided by 10 when the validation error stops
# improving, at most 90 epochs. DATA is a directory made by `alexnet prepare imagenet`.
# Extra arguments are passed on, e.g. `--name myrun` or `--set schedule.patience=3`.
set -euo pipefail
DATA=${DATA:-data/imagenet}
exec alexnet train --data "$DATA" --preset paper --workers 8 "$@"

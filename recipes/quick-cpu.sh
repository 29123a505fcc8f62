#!/usr/bin/env bash
# A smoke run (3 epochs, small model) on any small prepared dataset: checks the whole
# pipeline in minutes. DATA: e.g. a Fashion-MNIST or CIFAR-10 directory from `alexnet prepare`.
set -euo pipefail
DATA=${DATA:-data/fashion-mnist}
exec alexnet train --data "$DATA" --preset quick "$@"

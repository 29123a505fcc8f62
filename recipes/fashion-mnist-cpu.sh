#!/usr/bin/env bash
# The small architecture on Fashion-MNIST on a CPU. Prepares the data once (from the Debian
# package dataset-fashion-mnist, or add --download), then trains with the `small` preset.
set -euo pipefail
DATA=${DATA:-data/fashion-mnist}
[ -f "$DATA/meta.json" ] || alexnet prepare fashion-mnist "$DATA"
exec alexnet train --data "$DATA" --preset small "$@"

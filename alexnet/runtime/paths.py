"""Where the package keeps what it makes once and reuses: ``$ALEXNET_HOME`` (default
``~/.cache/alexnet``).

    downloads/   published weight files as published (``alexnet.interop.weights``)
    converted/   our checkpoints of them
    datasets/    folders of images, prepared once (``alexnet.data.folders``)
    engines/     the inference engine each kind of job runs fastest on this machine, and the
                 graphs of checkpoints whose own folder cannot be written
                 (``alexnet.interop.engines``)
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_HOME = "ALEXNET_HOME"


def home() -> Path:
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".cache" / "alexnet").expanduser()

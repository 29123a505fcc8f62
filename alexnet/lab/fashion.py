"""Fashion-MNIST for the lab: the four IDX files found or fetched, prepared once.

The files come from Debian's ``dataset-fashion-mnist`` (installed with apt-get when we are
root and it is missing) or else the canonical download, MD5-checked; ``ensure_prepared``
writes the prepared format of ``alexnet prepare`` unless it is there and verifies.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from alexnet.data import small, store
from alexnet.data.verify import verify
from alexnet.runtime.errors import UserError
from alexnet.runtime.owner import owned

DEBIAN_PACKAGE = "dataset-fashion-mnist"
IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
DEFAULT_DATA = Path("data/fashion-mnist")  # where the experiments prepare it by default


def _has_idx(folder: Path) -> bool:
    return all((folder / s).is_file() or (folder / f"{s}.gz").is_file() for s in IDX_STEMS)


def _apt_get(*args: str) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"demo: apt-get {' '.join(args)}", flush=True)
    return subprocess.run(["apt-get", *args], env=env).returncode == 0


def fetch_fashion_mnist(source: Path | None, download_dir: Path) -> Path:
    """A folder with the four IDX files: ``source`` if given, else Debian's package (installed
    when we are root and have apt-get), else the canonical download into ``download_dir``."""
    if source is not None:
        if not _has_idx(source):
            raise UserError(f"{source}: no Fashion-MNIST IDX files ({', '.join(IDX_STEMS)})")
        return source
    debian = Path(small.FASHION_MNIST_DIR)
    if _has_idx(debian):
        print(f"demo: Fashion-MNIST from {debian} (Debian package {DEBIAN_PACKAGE})")
        return debian
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"demo: {debian} is missing: installing the Debian package {DEBIAN_PACKAGE}")
        ok = _apt_get("install", "-y", "--no-install-recommends", DEBIAN_PACKAGE)
        if not ok and _apt_get("update"):
            ok = _apt_get("install", "-y", "--no-install-recommends", DEBIAN_PACKAGE)
        if ok and _has_idx(debian):
            return debian
        print(f"demo: apt-get could not provide {DEBIAN_PACKAGE}; downloading instead")
    print(
        f"demo: downloading Fashion-MNIST from {small.FASHION_MNIST_URL} into {download_dir} "
        "(MD5-checked)",
        flush=True,
    )
    return small.download_fashion_mnist(download_dir)


def validation_size(train_images: int) -> int:
    """Fashion-MNIST's 60,000 hold out ``small.VAL_SIZE`` (5,000, a twelfth); a smaller
    training set a twelfth of its images."""
    return min(small.VAL_SIZE, max(1, train_images // 12))


def ensure_prepared(data: Path, source: Path | None) -> dict:
    """Prepare Fashion-MNIST into ``data`` unless a prepared dataset is there and verifies.
    Returns its meta.json. A second process (two demos at once) waits for the first's
    preparation and then reuses it."""
    with owned(data, what="prepared dataset", wait=True):
        return _ensure_prepared(data, source)


def _ensure_prepared(data: Path, source: Path | None) -> dict:
    if (data / "meta.json").is_file() and store.read_meta(data).get("val_is_official_test_set"):
        # Prepared before the validation split was held out: its val split is the test set.
        print(
            f"demo: {data} uses the test set as its validation split (an older preparation): "
            "preparing it again with a held-out validation split",
            flush=True,
        )
    elif (data / "meta.json").is_file():
        try:
            verify(data, quick=True)
        except UserError as e:
            raise UserError(
                f"{e} (delete {data} and run the demo again to prepare it anew)"
            ) from None
        print(f"demo: reusing the prepared dataset in {data}")
        return store.read_meta(data)
    folder = fetch_fashion_mnist(source, data / "source")
    splits = small.load_fashion_mnist(folder)
    small.prepare_small(
        data,
        "fashion-mnist",
        splits,
        small.FASHION_MNIST_CLASSES,
        str(folder),
        val_size=validation_size(len(splits["train"][1])),
    )
    return store.read_meta(data)


def resolve_data(data: Path | None) -> tuple[Path, dict]:
    """A prepared directory and its meta.json; without one, Fashion-MNIST in ``DEFAULT_DATA``,
    prepared there if needed."""
    if data is not None:
        if not (data / "meta.json").is_file():
            raise UserError(f"{data}: not a prepared dataset (no meta.json; `alexnet prepare`)")
        return data, store.read_meta(data)
    return DEFAULT_DATA, ensure_prepared(DEFAULT_DATA, None)

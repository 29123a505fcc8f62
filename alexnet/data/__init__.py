"""Data (PAPER sections 2 and 4.1, B1-B5, G1-G2): prepare once, read fast, augment on device.

- ``alexnet prepare`` (``prepare.py``, ``sources.py``) writes a prepared directory
  (``store.py`` describes the format); ``prepare_arrays`` does the same from arrays.
- ``PreparedDataset`` and ``make_loader`` (``dataset.py``) read it as uint8 batches.
- ``DeviceAugment`` (``augment.py``) crops, flips, adds colour noise and subtracts the mean
  image on the device.
"""

from alexnet.data.augment import DeviceAugment
from alexnet.data.dataset import Loader, PreparedDataset, make_loader
from alexnet.data.store import prepare_arrays

__all__ = ["DeviceAugment", "Loader", "PreparedDataset", "make_loader", "prepare_arrays"]

"""Reading a prepared directory: ``PreparedDataset`` and ``make_loader``.

Batches leave the loader as uint8 (B, C, H, W) at the stored size (256x256 for ImageNet,
PAPER B1); every random choice (crop, flip, colour noise) is made later on the device by
``DeviceAugment`` from a seeded generator. The loader itself is therefore deterministic: the
same (seed, epoch, rank) gives the same batches whatever the number of workers.

The returned image tensors are (B, C, H, W) views of an NHWC buffer, i.e. in
``torch.channels_last`` memory format; ``.to(device)`` keeps that layout, which is the fast one
for convolutions on GPUs and on CPUs with oneDNN.
"""

from __future__ import annotations

import math
import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from alexnet.data import store
from alexnet.runtime.errors import UserError


class PreparedDataset(torch.utils.data.Dataset):
    """One split of a prepared directory. ``ds[i] -> (uint8 tensor (C, H, W), label)``.

    The record file is memory-mapped lazily in each process (after a DataLoader worker forks
    or spawns), so the dataset pickles as a path and workers share the page cache.
    """

    def __init__(
        self, root: str | Path, split: str = "train", *, check: bool | None = None
    ) -> None:
        self.root, self.split = Path(root), split
        self.meta = store.read_meta(self.root)
        if split not in self.meta["splits"]:
            raise UserError(
                f"{self.root}: no split {split!r} (has {', '.join(self.meta['splits'])})"
            )
        self.storage: str = self.meta["storage"]
        self.classes: list[str] = list(self.meta["classes"])
        self.class_names: list[str] = list(self.meta["class_names"])
        self.image_size: tuple[int, int] = tuple(self.meta["image_size"])
        self.channels: int = int(self.meta["channels"])
        index, _ = store.open_split(self.root, split)
        if len(index) != self.meta["splits"][split]["count"]:
            raise UserError(
                f"{self.root / (split + '.index.npy')}: {len(index)} records, meta.json says "
                f"{self.meta['splits'][split]['count']}"
            )
        self.labels = torch.from_numpy(np.array(index["label"], dtype=np.int64))
        # The CRC-32 of each record as it is read (see check_records_default); a dataset
        # prepared before checksums were stored (format version 1) has none to check.
        self.check = store.has_checksums(index) and (
            check_records_default(self.storage) if check is None else bool(check)
        )
        self._index = self._data = None
        self._stats: dict[str, torch.Tensor] | None = None

    @property
    def record_shape(self) -> tuple[int, int, int]:
        return (*self.image_size, self.channels)

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        """``mean`` (C, H, W), ``eigvals`` (C,), ``eigvecs`` (C, C) float32, 0-255 units."""
        if self._stats is None:
            raw = store.read_stats(self.root)
            self._stats = {k: torch.from_numpy(v) for k, v in raw.items()}
        return self._stats

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_index"] = state["_data"] = None
        return state

    def _open(self) -> None:
        if self._data is None:
            self._index, self._data = store.open_split(self.root, self.split)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        images = self.get_batch(np.array([i]))
        return images[0], int(self.labels[i])

    def records(self, indices: np.ndarray) -> list[np.ndarray]:
        """The stored bytes of records ``indices`` (views of the memory map), to decode
        elsewhere, e.g. on the GPU (``alexnet.data.decode.DeviceDecoder``)."""
        self._open()
        rows = self._index[np.asarray(indices, dtype=np.int64)]
        return [self._data[o : o + n] for o, n in zip(rows["offset"], rows["length"])]

    def get_batch(
        self, indices: np.ndarray, threads: ThreadPoolExecutor | None = None
    ) -> torch.Tensor:
        """Records ``indices`` as uint8 (B, C, H, W) (channels_last strides)."""
        self._open()
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < -len(self) or indices.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} records")
        indices = indices % max(len(self), 1)
        h, w, c = self.record_shape
        buf = torch.empty((len(indices), h, w, c), dtype=torch.uint8)
        out = buf.numpy()
        rows = self._index[indices]
        if self.storage == "raw":
            starts = rows["offset"] // (h * w * c)
            if np.all(rows["offset"] == starts * (h * w * c)):
                # Fixed-size records: one fancy-indexed memmap read, no per-image Python.
                out[...] = self._data.reshape(-1, h, w, c)[starts]
            else:
                for k, row in enumerate(rows):
                    off, n = int(row["offset"]), int(row["length"])
                    out[k] = self._data[off : off + n].reshape(h, w, c)
            for k in range(len(indices)) if self.check else ():
                self._check_crc(out[k], rows[k], indices[k])
        else:
            data = self._data

            def decode(k: int) -> None:
                off, n = int(rows["offset"][k]), int(rows["length"][k])
                if self.check:
                    self._check_crc(data[off : off + n], rows[k], indices[k])
                try:
                    store.decode_jpeg_into(data[off : off + n], out[k])
                except Exception as e:  # PIL raises many types for damaged bytes
                    where = store.record_label(self.root, self.split, int(indices[k]))
                    raise UserError(
                        f"{where}: does not decode ({type(e).__name__}: {e}); "
                        f"run alexnet prepare verify {self.root}"
                    ) from None

            if threads is None or len(indices) < 2:
                for k in range(len(indices)):
                    decode(k)
            else:
                list(threads.map(decode, range(len(indices))))
        return buf.permute(0, 3, 1, 2)

    def _check_crc(self, record, row, i) -> None:
        got = store.record_crc(record)
        if got != int(row["crc32"]):
            where = store.record_label(self.root, self.split, int(i))
            raise UserError(
                f"{where}: checksum mismatch (CRC-32 {got:08x}, the index says "
                f"{int(row['crc32']):08x}): the record is damaged; run alexnet prepare "
                f"verify {self.root}"
            )


def check_records_default(storage: str) -> bool:
    """Whether records are checked as they are read, unless the caller says: the environment
    variable ALEXNET_CHECK_RECORDS (1 or 0) decides; otherwise JPEG records are checked (the
    CRC costs ~0.3% of decoding one, docs/DATA.md) and raw ones are not (there it would cost
    more than the copy that reads them; ``alexnet prepare verify`` checks them all)."""
    env = os.environ.get("ALEXNET_CHECK_RECORDS", "").strip()
    if env in ("0", "1"):
        return env == "1"
    if env:
        raise UserError(f"ALEXNET_CHECK_RECORDS={env!r}: must be 0 or 1")
    return storage == "jpeg"


class _Failed:
    """A worker's UserError, carried to the main process as data: raised there as one line
    (a re-raised worker exception would carry the worker's traceback in its message)."""

    def __init__(self, message: str) -> None:
        self.message = message


class _BatchFetcher(torch.utils.data.Dataset):
    """Maps one batch of indices to one collated batch, so workers build whole batches."""

    def __init__(self, ds: PreparedDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, indices: np.ndarray):
        try:
            return self.ds.get_batch(indices), self.ds.labels[torch.from_numpy(indices)]
        except UserError as e:
            return _Failed(str(e))


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The epoch's global order: a pure function of (seed, epoch), as DistributedSampler."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    g = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=g).numpy().astype(np.int64)


def rank_indices(
    order: np.ndarray, *, rank: int, world_size: int, drop_last: bool, pad: bool
) -> np.ndarray:
    """This rank's disjoint share of ``order``.

    As DistributedSampler: with ``drop_last`` the tail is trimmed so every rank gets
    ``floor(n / world_size)``; otherwise it is padded with the first indices again so every
    rank gets ``ceil(n / world_size)`` (training needs equal steps on every rank). With
    ``pad=False`` (exact evaluation) nothing is repeated and ranks may differ by one record.
    """
    n = len(order)
    if world_size > 1 and drop_last:
        order = order[: (n // world_size) * world_size]
    elif world_size > 1 and pad and n % world_size:
        total = math.ceil(n / world_size) * world_size
        reps = math.ceil(total / max(n, 1))
        order = np.concatenate([order] * (reps + 1))[:total]
    return order[rank::world_size]


class _CurrentBatches(torch.utils.data.Sampler):
    """The batches of the loader's current pass (read when the DataLoader starts a pass)."""

    def __init__(self, loader: Loader) -> None:
        self.loader = loader

    def __iter__(self):
        return iter(self.loader._todo)

    def __len__(self) -> int:
        return len(self.loader._todo)


class Loader:
    """Batches of one split for one rank. See ``make_loader``."""

    def __init__(
        self,
        ds,
        batch_size,
        *,
        shuffle,
        seed,
        num_workers,
        drop_last,
        rank,
        world_size,
        pad=True,
        pin_memory=None,
        threads=None,
        prefetch_factor=2,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.ds, self.batch_size = ds, int(batch_size)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.threads = threads if threads is not None else min(4, torch.get_num_threads())
        self.prefetch_factor = prefetch_factor
        self.epoch = 0
        self.start_batch = 0
        self.batches_done = 0
        self._todo: list[np.ndarray] = []
        self._workers = None
        self._passes: weakref.WeakSet = weakref.WeakSet()

    def set_epoch(self, epoch: int) -> None:
        """Another epoch starts at its first batch; the same epoch keeps its position."""
        if int(epoch) != self.epoch:
            self.epoch, self.start_batch, self.batches_done = int(epoch), 0, 0

    @property
    def position(self) -> int:
        """Batches of this epoch yielded so far (or to be skipped, after ``load_state_dict``)."""
        return self.batches_done

    def batches(self) -> list[np.ndarray]:
        """This epoch's batches of dataset indices for this rank (all of them)."""
        order = epoch_order(len(self.ds), shuffle=self.shuffle, seed=self.seed, epoch=self.epoch)
        mine = rank_indices(
            order,
            rank=self.rank,
            world_size=self.world_size,
            drop_last=self.drop_last,
            pad=self.pad,
        )
        out = [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out.pop()
        return out

    def __len__(self) -> int:
        """Batches in a whole epoch (``start_batch`` not subtracted)."""
        n, ws = len(self.ds), self.world_size
        if ws > 1 and self.drop_last:
            mine = n // ws
        elif ws > 1 and self.pad:
            mine = math.ceil(n / ws)
        else:
            mine = len(range(self.rank, n, ws))
        return mine // self.batch_size if self.drop_last else math.ceil(mine / self.batch_size)

    def state_dict(self) -> dict:
        """Where this loader stands: resume with ``load_state_dict`` for the exact next batch."""
        return {"seed": self.seed, "epoch": self.epoch, "start_batch": self.batches_done}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        # "batch": the key of checkpoints written before the loader kept its own position
        self.start_batch = int(state["start_batch"] if "start_batch" in state else state["batch"])
        self.batches_done = self.start_batch

    def __iter__(self):
        gen = self._pass()
        self._passes.add(gen)  # so that ``close`` can end a pass left half-way
        return gen

    def _pass(self):
        todo = self.batches()[self.start_batch :]
        self.batches_done = self.start_batch
        self.start_batch = 0  # the skip applies to this one pass only
        if self.num_workers == 0:
            yield from self._iter_inline(todo)
            return
        self._todo = todo
        if self._workers is None:
            # Created once: persistent workers survive epochs; the sampler reads ``_todo``.
            self._workers = torch.utils.data.DataLoader(
                _BatchFetcher(self.ds),
                batch_size=None,
                sampler=_CurrentBatches(self),
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch_factor,
                persistent_workers=True,
                # its own generator for the workers' base seed: drawn from the global one, it
                # moved dropout's draws (PAPER C1) by one where a resumed process started its
                # workers at another step than the unbroken run, and resume was not exact
                generator=torch.Generator().manual_seed(self.seed),
            )
        for batch in self._workers:
            if isinstance(batch, _Failed):
                raise UserError(batch.message)
            self.batches_done += 1
            yield batch

    def close(self) -> None:
        """Stop the worker processes now (they are also stopped when the loader is deleted):
        every pass left half-way is ended (a suspended pass holds the workers' iterator) and
        the DataLoader let go of; the iterator, freed with it, shuts its workers down."""
        for gen in list(self._passes):
            gen.close()
        self._workers = None

    def _iter_inline(self, todo):
        # PIL releases the GIL while decoding, so threads decode a batch in parallel.
        pool = ThreadPoolExecutor(self.threads) if self.ds.storage != "raw" else None
        try:
            for idx in todo:
                images = self.ds.get_batch(idx, pool)
                labels = self.ds.labels[torch.from_numpy(idx)]
                if self.pin_memory:
                    images, labels = images.pin_memory(), labels.pin_memory()
                self.batches_done += 1
                yield images, labels
        finally:
            if pool is not None:
                pool.shutdown()


def make_loader(
    ds: PreparedDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    pad: bool = True,
    pin_memory: bool | None = None,
    threads: int | None = None,
) -> Loader:
    """A loader yielding ``(uint8 (B, C, H, W), int64 (B,))`` for this rank.

    The order is a pure function of (seed, epoch) (call ``set_epoch`` each epoch); ranks get
    disjoint strided shares (see ``rank_indices``). Set ``loader.start_batch = k`` before
    iterating to skip exactly the first k batches of the epoch (mid-epoch resume);
    ``loader.state_dict()`` records the position. ``num_workers=0`` decodes in the calling
    process with ``threads`` threads; otherwise worker processes each build whole batches.
    """
    return Loader(
        ds,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        num_workers=num_workers,
        drop_last=drop_last,
        rank=rank,
        world_size=world_size,
        pad=pad,
        pin_memory=pin_memory,
        threads=threads,
    )

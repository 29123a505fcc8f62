"""PreparedDataset and make_loader: records round-trip, order a function of (seed, epoch),
disjoint ranks, exact mid-epoch resume, the same batches with or without workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alexnet.data import PreparedDataset, make_loader, prepare_arrays
from alexnet.data.dataset import epoch_order
from alexnet.runtime.errors import UserError

N = 37


@pytest.fixture(scope="module")
def arrays_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (N, 9, 7, 3), dtype=np.uint8)
    # Encode each record's index in its first pixel so batches can be traced back.
    train[:, 0, 0, 0] = np.arange(N)
    val = rng.integers(0, 256, (5, 9, 7, 3), dtype=np.uint8)
    root = tmp_path_factory.mktemp("arrays")
    labels = np.arange(N) % 4
    prepare_arrays(
        root,
        {"train": (train, labels), "val": (val, np.arange(5) % 4)},
        ["a", "b", "c", "d"],
        ["A", "B", "C", "D"],
        dataset="test",
    )
    return root, train, labels


def test_records_round_trip_with_stats_and_names(arrays_dir):
    root, train, labels = arrays_dir
    ds = PreparedDataset(root, "train")
    assert len(ds) == N and ds.image_size == (9, 7) and ds.channels == 3
    assert ds.classes == ["a", "b", "c", "d"] and ds.class_names == ["A", "B", "C", "D"]
    for i in (0, 5, N - 1):
        x, y = ds[i]
        assert x.dtype == torch.uint8 and x.shape == (3, 9, 7)
        assert np.array_equal(x.permute(1, 2, 0).numpy(), train[i]) and y == labels[i]
    mean = train.astype(np.float64).mean(0).transpose(2, 0, 1)
    np.testing.assert_allclose(ds.stats["mean"].numpy(), mean, rtol=1e-6)
    assert ds.stats["eigvecs"].shape == (3, 3)
    assert len(PreparedDataset(root, "val")) == 5
    with pytest.raises(UserError, match="no split 'test'"):
        PreparedDataset(root, "test")


def _ids(batch):
    return batch[0][:, 0, 0, 0].tolist()


def test_order_is_a_pure_function_of_seed_and_epoch(arrays_dir):
    ds = PreparedDataset(arrays_dir[0], "train")
    loader = make_loader(ds, 8, shuffle=True, seed=3)
    loader.set_epoch(1)
    first = [i for b in loader for i in _ids(b)]
    again = [i for b in loader for i in _ids(b)]
    loader.set_epoch(2)
    other = [i for b in loader for i in _ids(b)]
    assert first == again != other
    assert sorted(first) == list(range(N))
    assert first == epoch_order(N, shuffle=True, seed=3, epoch=1).tolist()
    plain = [i for b in make_loader(ds, 8, shuffle=False) for i in _ids(b)]
    assert plain == list(range(N))


def test_labels_follow_their_images(arrays_dir):
    ds = PreparedDataset(arrays_dir[0], "train")
    for images, labels in make_loader(ds, 5, shuffle=True, seed=0):
        assert labels.dtype == torch.int64
        assert labels.tolist() == [arrays_dir[2][i] for i in _ids((images, labels))]


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_are_disjoint_and_cover_like_distributed_sampler(arrays_dir, drop_last):
    ds = PreparedDataset(arrays_dir[0], "train")
    world = 4
    per_rank = []
    for rank in range(world):
        loader = make_loader(
            ds, 4, shuffle=True, seed=1, drop_last=drop_last, rank=rank, world_size=world
        )
        loader.set_epoch(7)
        ids = [i for b in loader for i in _ids(b)]
        assert len(loader) == len(list(loader))
        per_rank.append(ids)
    lengths = {len(ids) for ids in per_rank}
    assert len(lengths) == 1  # the same number of steps on every rank
    flat = [i for ids in per_rank for i in ids]
    if drop_last:  # trimmed to 36, then whole batches of 4: 9 per rank -> 8
        assert len(set(flat)) == len(flat) == 32
    else:  # padded to 40 with the first 3 of the order again (DistributedSampler)
        assert len(flat) == 40 and set(flat) == set(range(N))
        order = epoch_order(N, shuffle=True, seed=1, epoch=7)
        dupes = sorted(i for i in set(flat) if flat.count(i) > 1)
        assert dupes == sorted(order[:3].tolist())


def test_unpadded_ranks_partition_exactly_for_evaluation(arrays_dir):
    ds = PreparedDataset(arrays_dir[0], "train")
    got = []
    for rank in range(3):
        loader = make_loader(ds, 5, shuffle=False, rank=rank, world_size=3, pad=False)
        ids = [i for b in loader for i in _ids(b)]
        assert len(loader) == len(list(loader))
        got += ids
    assert sorted(got) == list(range(N))


def test_start_batch_resumes_exactly_mid_epoch(arrays_dir):
    ds = PreparedDataset(arrays_dir[0], "train")
    full = make_loader(ds, 6, shuffle=True, seed=9, rank=1, world_size=2)
    full.set_epoch(4)
    whole = [_ids(b) for b in full]
    run = make_loader(ds, 6, shuffle=True, seed=9, rank=1, world_size=2)
    run.set_epoch(4)
    it = iter(run)
    seen = [_ids(next(it)) for _ in range(2)]
    state = run.state_dict()
    assert state == {"seed": 9, "epoch": 4, "start_batch": 2}
    resumed = make_loader(ds, 6, shuffle=True, seed=0, rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = [_ids(b) for b in resumed]
    assert seen + rest == whole
    assert [_ids(b) for b in resumed] == whole  # the skip applies to one pass only
    manual = make_loader(ds, 6, shuffle=True, seed=9, rank=1, world_size=2)
    manual.set_epoch(4)
    manual.start_batch = 3
    assert [_ids(b) for b in manual] == whole[3:]


def test_workers_give_the_same_batches_as_the_main_process(arrays_dir):
    ds = PreparedDataset(arrays_dir[0], "train")
    results = []
    for workers in (0, 2):
        loader = make_loader(ds, 8, shuffle=True, seed=2, num_workers=workers)
        got = []
        for epoch in (1, 2):  # the same (persistent) workers serve the second epoch
            loader.set_epoch(epoch)
            got += [(x.clone(), y.clone()) for x, y in loader]
        results.append(got)
    for (x0, y0), (x1, y1) in zip(*results, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
        assert x0.dtype == torch.uint8 and x0.shape[1:] == (3, 9, 7)


def test_jpeg_records_decode_in_threads_and_workers(tmp_path):
    from alexnet.data import store

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    prepare_arrays(tmp_path, {"train": (images, np.zeros(10))}, ["x"])
    # Rewrite the records as JPEG to exercise the decoding path on the same pixels.
    recs = [store.encode_jpeg(im, 95) for im in images]
    lengths = np.array([len(r) for r in recs])
    (tmp_path / "train.bin").write_bytes(b"".join(recs))
    store.write_index(
        tmp_path / "train.index.npy", np.cumsum(lengths) - lengths, lengths, np.zeros(10)
    )
    meta = store.read_meta(tmp_path)
    meta["storage"] = "jpeg"
    store.write_meta(tmp_path, {k: v for k, v in meta.items() if k not in ("format", "version")})
    ds = PreparedDataset(tmp_path, "train")
    ref = np.stack([np.empty((16, 16, 3), np.uint8) for _ in range(10)])
    for k, r in enumerate(recs):
        store.decode_jpeg_into(r, ref[k])
    assert np.abs(ref.astype(int) - images).mean() < 8  # JPEG q95 of noise: close, not equal
    for workers, threads in ((0, 1), (0, 3), (2, 1)):
        loader = make_loader(ds, 4, shuffle=False, num_workers=workers, threads=threads)
        got = torch.cat([x for x, _ in loader]).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(got, ref)


def test_close_stops_the_workers_of_a_pass_left_half_way(tmp_path):
    """With persistent workers, a pass stopped half-way (a training interrupted, a bench
    that took what it needed) keeps the workers' iterator; close ends such passes and lets
    the iterator go, and the workers stop (through torch's public lifetime, not its
    private shutdown)."""
    import multiprocessing

    root = prepare_arrays(
        tmp_path / "d",
        {"train": (np.zeros((40, 8, 8, 3), np.uint8), np.arange(40) % 2)},
        ["a", "b"],
    )
    before = set(multiprocessing.active_children())
    loader = make_loader(PreparedDataset(root, "train"), 4, shuffle=False, num_workers=2)
    it = iter(loader)
    next(it)
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    loader.close()
    for w in workers:
        w.join(timeout=10)
    assert not any(w.is_alive() for w in workers)

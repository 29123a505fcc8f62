"""``alexnet figures``: the paper's figures (section 6.1) and training curves, as PNG.

    alexnet figures filters --checkpoint C --out conv1.png                      # PAPER F1
    alexnet figures predictions --checkpoint C --data DIR --out predictions.png # PAPER F2
    alexnet figures neighbours --checkpoint C --data DIR --out neighbours.png   # PAPER F3
    alexnet figures curves --run runs/x --out curves.png

Figures run on the CPU (a few images each). ``neighbours`` searches the training split's fc7
vectors; for a large split compute them once with ``alexnet features extract`` (which takes
``--device cuda``) and pass the arrays it wrote (``--index-features``).
"""

from __future__ import annotations

import argparse
import math
import textwrap
from pathlib import Path

import numpy as np

from alexnet.data.store import search_split
from alexnet.data.subset import subset_indices
from alexnet.features import features_of
from alexnet.figures_flags import add_arguments  # noqa: F401 - the command's options
from alexnet.retrieval import knn
from alexnet.runtime.errors import UserError
from alexnet.runtime.plotting import pyplot, save_png
from alexnet.runtime.runlog import read_metrics

TRUE_COLOUR, OTHER_COLOUR = "#d62728", "#1f77b4"


def _hwc(image) -> np.ndarray:
    """(C, H, W) uint8 tensor/array -> what imshow takes: (H, W, 3) or (H, W)."""
    a = np.asarray(image)
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)


# ---------------------------------------------------------------------------------- F1
def filter_grid(weight, towers: int = 2, cols: int = 16, gap: int = 1, tower_gap: int = 6):
    """conv1 kernels (O, C, k, k) as one (H, W, 3) image in [0, 1] (NaN = background).

    Each kernel is stretched to [0, 1] on its own (min to 0, max to 1 over its colours), so
    weak and strong kernels are equally visible. Kernel j belongs to tower j // (O / towers)
    (the first half of conv1's maps feeds the first tower's conv2, PAPER A12); each tower's
    kernels fill their own block of rows, ``tower_gap`` pixels below the previous one."""
    w = np.asarray(weight, dtype=np.float64)
    o, c, kh, kw = w.shape
    per = o // towers
    cols = min(cols, per)
    rows = math.ceil(per / cols)
    lo = w.reshape(o, -1).min(1)[:, None, None, None]
    hi = w.reshape(o, -1).max(1)[:, None, None, None]
    w = (w - lo) / np.maximum(hi - lo, 1e-12)
    if c == 1:
        w = np.repeat(w, 3, axis=1)
    elif c != 3:
        w = np.repeat(w.mean(1, keepdims=True), 3, axis=1)  # not an image: show the mean
    block_h = rows * (kh + gap) - gap
    grid = np.full(
        (towers * block_h + (towers - 1) * tower_gap, cols * (kw + gap) - gap, 3), np.nan
    )
    for j in range(o):
        t, i = divmod(j, per)
        r, col = divmod(i, cols)
        y = t * (block_h + tower_gap) + r * (kh + gap)
        x = col * (kw + gap)
        grid[y : y + kh, x : x + kw] = w[j].transpose(1, 2, 0)
    return grid


def plot_filters(weight, towers: int, out: Path, title: str = "") -> None:
    """The grid of ``filter_grid``, each kernel at least a third of an inch wide however few
    its pixels (a 3x3 kernel was three screen pixels), with a title that says what is drawn."""
    plt = pyplot()
    o, c, kh, _ = np.asarray(weight).shape
    grid = filter_grid(weight, towers, tower_gap=max(2, kh // 2 + 1))
    shown = np.where(np.isnan(grid), 1.0, grid)  # background white
    inches = max(1 / 12, 0.36 / kh, 6.0 / grid.shape[1])  # one kernel pixel
    height = grid.shape[0] * inches
    fig, ax = plt.subplots(figsize=(grid.shape[1] * inches, height + 0.9), dpi=100)
    ax.imshow(shown, interpolation="nearest")
    ax.set_axis_off()
    colour = "RGB" if c == 3 else "grey" if c == 1 else f"mean of {c} channels"
    rows = f"; each tower's {o // towers} in its own block of rows" if towers > 1 else ""
    ax.set_title(
        title
        or f"conv1's {o} kernels ({kh}x{kh}, {colour}), each stretched to its own full range"
        f"{rows} (PAPER F1, the paper's Figure 3)",
        fontsize=9,
        wrap=True,
    )
    save_png(fig, out)


# ---------------------------------------------------------------------------------- F2
def plot_predictions(images, top, truth, out: Path, cols: int = 4, known: bool = True) -> None:
    """Each image above its five most probable classes as bars (PAPER F2); the true class
    (``truth``: per image its class id and name) is written under the image and its bar is
    red. ``known``: the images' classes are all the network's."""
    plt = pyplot()
    n = len(images)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = plt.figure(figsize=(2.6 * cols, 4.2 * rows), dpi=100)
    grid = fig.add_gridspec(
        2 * rows, cols, height_ratios=[3, 2] * rows, hspace=0.35, wspace=0.6, top=0.95, bottom=0.03
    )
    for i in range(n):
        r, c = divmod(i, cols)
        ax = fig.add_subplot(grid[2 * r, c])
        ax.imshow(_hwc(images[i]), cmap="gray", vmin=0, vmax=255)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_xlabel(_short(truth[i][1], 30), fontsize=8, color=TRUE_COLOUR)
        bars = fig.add_subplot(grid[2 * r + 1, c])
        shown = top[i][::-1]
        probs = [p["probability"] for p in shown]
        colours = [TRUE_COLOUR if p["class_id"] == truth[i][0] else OTHER_COLOUR for p in shown]
        bars.barh(range(len(shown)), probs, color=colours)
        for y, p in enumerate(probs):
            bars.text(min(p, 0.72) + 0.02, y, f"{100 * p:.1f}%", va="center", fontsize=6)
        bars.set_yticks(range(len(shown)), [_short(p["name"], 18) for p in shown], fontsize=7)
        bars.set_xlim(0, 1)
        bars.tick_params(axis="x", labelsize=7)
        bars.spines[["top", "right"]].set_visible(False)
    title = "five most probable classes (red: the true class, written under each image)"
    if not known:
        title = "the network's five most probable classes (red: the true class, where it has it)"
    fig.suptitle(title, fontsize=10, y=0.99)
    save_png(fig, out)


def _short(text: str, n: int) -> str:
    text = str(text).split(",")[0]
    return text if len(text) <= n else text[: n - 1] + "…"


# ---------------------------------------------------------------------------------- F3
def plot_neighbours(
    queries,
    neighbours,
    q_labels,
    n_labels,
    distances,
    names,
    out: Path,
    *,
    layer: str = "fc7",
    searched: int | None = None,
    what: str = "training images",
):
    """One row per query: the query, then its nearest ``what`` (PAPER F3: training images)
    of ``searched``. A neighbour of the query's class is framed green, of another class grey."""
    plt = pyplot()
    n, k = len(queries), neighbours.shape[1]
    fig, axes = plt.subplots(n, k + 1, figsize=(1.5 * (k + 1), 1.65 * n), dpi=100, squeeze=False)
    for i in range(n):
        ax = axes[i, 0]
        ax.imshow(_hwc(queries[i]), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"query: {_short(names[q_labels[i]], 14)}", fontsize=7, color=TRUE_COLOUR)
        _frame(ax, TRUE_COLOUR, 3)
        for j in range(k):
            ax = axes[i, j + 1]
            ax.imshow(_hwc(neighbours[i, j]), cmap="gray", vmin=0, vmax=255)
            same = n_labels[i, j] == q_labels[i]
            ax.set_title(
                f"{_short(names[n_labels[i, j]], 15)}\nd={distances[i, j]:.3g}", fontsize=6
            )
            _frame(ax, "#2ca02c" if same else "#999999", 2 if same else 1)
    among = f" of {searched:,}" if searched else ""
    title = (
        f"each query (left, red) and the {k} {what}{among} nearest to it in {layer} "
        "(Euclidean distance d; green frame: same class)"
    )
    # above the figure (va bottom at its top edge): never over the first row's titles
    fig.suptitle(textwrap.fill(title, int(1.5 * (k + 1) * 11)), fontsize=9, y=1.0, va="bottom")
    fig.subplots_adjust(top=1 - 0.3 / fig.get_figheight())  # room for two lines of labels
    save_png(fig, out)


def _frame(ax, colour: str, width: float) -> None:
    ax.set_xticks([]), ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(width)


# ------------------------------------------------------------------------------- curves
def plot_curves(records: list[dict], out: Path, title: str = "") -> None:
    """Loss, error (%) and learning rate (log scale) per epoch; rate cuts dotted (D4).
    ``title``: what run this is (the figure says the rest)."""
    plt = pyplot()
    epoch = [r["epoch"] for r in records]

    def series(key):
        return [r.get(key, np.nan) if r.get(key) is not None else np.nan for r in records]

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.6), dpi=100)
    a.plot(epoch, series("train_loss"), "o-", ms=3, label="train")
    if any("val_loss" in r for r in records):
        a.plot(epoch, series("val_loss"), "o-", ms=3, label="validation")
    a.set(title="loss (cross-entropy)", xlabel="epoch")
    for key, label in (
        ("train_error", "train top-1"),
        ("val_top1_error", "val top-1"),
        ("val_top5_error", "val top-5"),
    ):
        b.plot(epoch, [100 * v for v in series(key)], "o-", ms=3, label=label)
    b.set(title="error (%)", xlabel="epoch")
    lr = series("lr")
    c.step(epoch, lr, where="mid", color="black")  # one rate per epoch, cut between epochs
    c.plot(epoch, lr, "o", ms=3, color="black")
    c.set_yscale("log")
    c.set(title="learning rate", xlabel="epoch")
    for i in range(1, len(lr)):
        if lr[i] != lr[i - 1]:
            for ax in (a, b, c):
                ax.axvline(epoch[i] - 0.5, color="grey", ls=":", lw=1)
    for ax in (a, b):
        ax.legend(fontsize=8)
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
    what = "loss, top-1/top-5 error and learning rate per epoch; dotted lines: rate cuts (D4)"
    fig.suptitle(f"{title}: {what}" if title else what, fontsize=10)
    fig.tight_layout()
    save_png(fig, out)


# ------------------------------------------------------------------- from a network
def _chosen(ds, indices: list[int] | None, n: int, seed: int) -> np.ndarray:
    if indices:
        bad = [i for i in indices if not 0 <= i < len(ds)]
        if bad:
            raise UserError(f"--indices {bad}: {ds.split} has {len(ds)} images")
        return np.array(indices)
    return subset_indices(ds.labels, n, seed)


def filters_figure(predictor, out: Path) -> None:
    """PAPER F1: the network's conv1 kernels, each tower in its own rows."""
    network = predictor.network
    towers = 2 if network.config.get("towers") else 1
    plot_filters(network.conv1.weight.detach().float().cpu(), towers, out)


def predictions_figure(
    predictor,
    ds,
    out: Path,
    *,
    indices: list[int] | None = None,
    n: int = 8,
    seed: int = 0,
    views: int = 10,
) -> None:
    """PAPER F2: ``indices`` (else ``n`` drawn at random with ``seed``) of ``ds``, each with
    the five most probable classes over ``views`` test views."""
    predictor.check_data(ds, labels=False)  # the truth is shown by the data's own class id
    idx = _chosen(ds, indices, n, seed)
    images = ds.get_batch(idx).contiguous()
    top = predictor.predict(images, 5, views)
    truth = [(ds.classes[i], ds.class_names[i]) for i in ds.labels[idx].tolist()]
    known = set(ds.classes) <= set(predictor.classes)
    plot_predictions(images, top, truth, out, known=known)


def nearest_figure(
    query_ds,
    query_idx,
    query,
    index_ds,
    index,
    out: Path,
    *,
    k: int = 6,
    pool: np.ndarray | None = None,
    layer: str = "fc7",
) -> None:
    """PAPER F3: the records ``query_idx`` of ``query_ds`` (features ``query``) and their ``k``
    nearest records of ``index_ds`` (features ``index``: of every record, or of the records
    ``pool`` only)."""
    dist, nn = knn(query, index, min(k, len(index)))
    found = nn if pool is None else pool[nn]  # (queries, k) records of index_ds
    shown = index_ds.get_batch(found.reshape(-1)).reshape(
        *found.shape, *index_ds.get_batch([0]).shape[1:]
    )
    plot_neighbours(
        query_ds.get_batch(query_idx),
        shown,
        query_ds.labels[query_idx].numpy(),
        index_ds.labels.numpy()[found],
        dist,
        query_ds.class_names,
        out,
        layer=layer,
        searched=len(index),
        what=_searched(index_ds.split),
    )


def _searched(split: str) -> str:
    from alexnet.data.folders import FOLDER_SPLIT

    names = {"train": "training images", FOLDER_SPLIT: "other images of the folder"}
    return names.get(split, f"{split} images")


def neighbours_figure(
    predictor,
    ds,
    index_ds,
    out: Path,
    *,
    indices: list[int] | None = None,
    n: int = 5,
    seed: int = 0,
    views: int = 1,
    index_features: Path | None = None,
    layer: str = "fc7",
    k: int = 6,
) -> None:
    """``nearest_figure`` for queries of ``ds`` among all of ``index_ds`` in ``layer`` (but
    the queries themselves, where both are one split), whose features are read from
    ``index_features`` if given, else computed here."""
    predictor.check_data(ds, labels=False)  # neighbours are framed by the data's own labels
    predictor.check_data(index_ds, labels=False)
    idx = _chosen(ds, indices, n, seed)
    query = features_of(predictor, ds, idx, layer, views=views)
    pool = np.arange(len(index_ds))
    if (ds.root, ds.split) == (index_ds.root, index_ds.split):
        pool = np.setdiff1d(pool, idx)  # a query is not its own neighbour: the other images
    if index_features:
        index = np.load(index_features, mmap_mode="r")
        if index.shape != (len(index_ds), query.shape[1]):
            raise UserError(
                f"{index_features}: shape {index.shape}, expected "
                f"({len(index_ds)}, {query.shape[1]}) {layer} features of {index_ds.split}"
            )
        index = index if len(pool) == len(index_ds) else index[pool]
    else:
        index = features_of(predictor, index_ds, pool, layer, views=views)
    nearest_figure(ds, idx, query, index_ds, index, out, k=k, pool=pool, layer=layer)


# ------------------------------------------------------------------------------ command
def run(args: argparse.Namespace) -> int:
    from alexnet.data.folders import open_images
    from alexnet.inference import card_of, load_from_args, single_source

    if args.what == "curves":
        title = f"the run {Path(args.run).resolve().name}"
        plot_curves(read_metrics(args.run), args.out, title=title)
        print(f"wrote {args.out}")
        return 0
    source = single_source(args)
    if args.what == "filters":
        filters_figure(load_from_args(args, source), args.out)
        print(f"wrote {args.out}")
        return 0
    card = card_of(source)
    ds = open_images(args.data, args.split, card)
    draw = dict(indices=args.indices, n=args.n, seed=args.seed, views=args.views)
    if args.what == "predictions":
        predictor = load_from_args(args, source, inputs=args.n)
        predictions_figure(predictor, ds, args.out, **draw)
    else:
        index_ds = open_images(args.data, args.index_split or search_split(ds.meta), card)
        predictor = load_from_args(args, source, layer=args.layer, inputs=len(index_ds))
        neighbours_figure(
            predictor,
            ds,
            index_ds,
            args.out,
            **draw,
            index_features=args.index_features,
            layer=args.layer,
            k=args.k,
        )
    print(f"wrote {args.out}")
    return 0

"""Split a labelled training set over the peers of a graph.

Decentralized learning is interesting because peers see *different* data; the schemes here
control how different. Every function is deterministic for a given seed so that a run can be
repeated exactly.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from declora.errors import PartitionError

SCHEMES = ("iid", "dirichlet", "label-skew", "natural", "quantity")

MAX_DRAWS = 100
"""How often dirichlet / quantity redraw before giving up on min_size."""

PROPORTION_TOLERANCE = 1e-6


def partition(
    labels: np.ndarray,
    n_peers: int,
    scheme: str,
    *,
    seed: int = 0,
    alpha: float = 0.5,
    min_size: int = 1,
    proportions: list[list[float]] | None = None,
    groups: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Return one sorted int64 index array per peer; the arrays are pairwise disjoint.

    Schemes:

    - ``iid``: shuffle and split as evenly as possible; every example is used once.
    - ``dirichlet``: per class, peer shares ~ Dir(alpha); smaller alpha gives more label
      skew. Every example is used once. Redrawn until each peer has >= ``min_size``.
    - ``label-skew``: ``proportions[i][c]`` is the share of class ``c`` in peer ``i``'s data.
      All peers get the same size ``s``, the largest that the class counts can supply; each
      peer's class counts are ``s * proportions[i]`` rounded by largest remainder (so they sum
      to exactly ``s``). Examples not needed to meet the proportions are *dropped*: exact
      proportions over unequal class counts cannot use everything.
    - ``natural``: ``groups`` gives one value per example (e.g. a topic or an author); whole
      groups go to peers, largest first to the currently smallest peer.
    - ``quantity``: peer sizes ~ Dir(alpha) * N (each >= ``min_size``), content iid.

    Labels must be non-negative integer class ids. No peer is ever left empty.
    """
    labels = _as_labels(labels)
    _check_common(labels, n_peers, scheme, alpha, min_size)
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = _iid(len(labels), n_peers, rng)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, n_peers, rng, alpha, min_size)
    elif scheme == "label-skew":
        parts = _label_skew(labels, n_peers, rng, proportions)
    elif scheme == "natural":
        parts = _natural(len(labels), n_peers, rng, groups)
    else:
        parts = _quantity(len(labels), n_peers, rng, alpha, min_size)
    parts = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    _check_nonempty(parts, scheme)
    return parts


def label_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-peer class counts, shape [n_peers, num_classes]: the raw material of skew reports."""
    labels = _as_labels(labels)
    if len(labels) and labels.max() >= num_classes:
        raise PartitionError(
            f"label {int(labels.max())} is out of range for num_classes={num_classes}; "
            f"labels must be 0..{num_classes - 1}"
        )
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, part in enumerate(parts):
        counts[i] = np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=num_classes)
    return counts


def skew_summary(counts: np.ndarray) -> dict:
    """Summarise how far each peer's label distribution is from the global one.

    ``mean_tv_distance`` is the average total-variation distance (0 = identical, 1 = disjoint
    support) between a peer's label distribution and the pooled one; empty peers are skipped.
    """
    counts = np.asarray(counts, dtype=np.int64)
    sizes = counts.sum(axis=1)
    total = int(sizes.sum())
    global_dist = counts.sum(axis=0) / max(total, 1)
    filled = sizes > 0
    peer_dist = counts[filled] / sizes[filled, None]
    tv = 0.5 * np.abs(peer_dist - global_dist).sum(axis=1)
    present = (counts > 0).sum(axis=1)
    return {
        "n_peers": len(counts),
        "num_classes": int(counts.shape[1]) if counts.ndim == 2 else 0,
        "total_examples": total,
        "min_peer_size": int(sizes.min()) if len(sizes) else 0,
        "max_peer_size": int(sizes.max()) if len(sizes) else 0,
        "mean_peer_size": float(sizes.mean()) if len(sizes) else 0.0,
        "mean_tv_distance": float(tv.mean()) if len(tv) else 0.0,
        "max_tv_distance": float(tv.max()) if len(tv) else 0.0,
        "min_classes_per_peer": int(present.min()) if len(present) else 0,
    }


# --------------------------------------------------------------------------- validation


def _as_labels(labels: np.ndarray) -> np.ndarray:
    """Labels as a 1-D int64 array; schemes index classes by id."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise PartitionError(f"labels must be a 1-D array of class ids; got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise PartitionError(f"labels must be integer class ids 0..C-1; got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise PartitionError(f"labels must be class ids 0..C-1; found {int(arr.min())}")
    return arr.astype(np.int64, copy=False)


def _check_common(
    labels: np.ndarray, n_peers: int, scheme: str, alpha: float, min_size: int
) -> None:
    """Reject requests that no scheme can satisfy, before drawing anything."""
    if scheme not in SCHEMES:
        raise PartitionError(f"unknown partition scheme {scheme!r}; accepted: {', '.join(SCHEMES)}")
    if not isinstance(n_peers, int | np.integer) or n_peers < 1:
        raise PartitionError(f"n_peers must be an integer >= 1; got {n_peers!r}")
    if len(labels) < n_peers:
        raise PartitionError(
            f"{len(labels)} examples cannot be split over {n_peers} peers; "
            "use fewer peers or more data"
        )
    if not alpha > 0:
        raise PartitionError(f"alpha must be > 0; got {alpha!r}")
    if min_size < 0:
        raise PartitionError(f"min_size must be >= 0; got {min_size!r}")


def _check_nonempty(parts: list[np.ndarray], scheme: str) -> None:
    """Every peer needs data to train on."""
    for i, part in enumerate(parts):
        if len(part) == 0:
            raise PartitionError(
                f"the {scheme} partition left peer {i} with no data; "
                "use fewer peers, more data or a less extreme setting"
            )


def _required_size(n: int, n_peers: int, min_size: int, scheme: str, alpha: float) -> int:
    """The per-peer minimum a random draw must meet (never below 1)."""
    need = max(min_size, 1)
    if need * n_peers > n:
        raise PartitionError(
            f"{scheme} partition: min_size={min_size} over {n_peers} peers needs "
            f"{need * n_peers} examples but there are {n}; lower min_size or use fewer peers"
        )
    return need


def _redraw_error(scheme: str, alpha: float, min_size: int, sizes: np.ndarray) -> PartitionError:
    """Explain a failed redraw loop, naming the peer that came up short."""
    worst = int(np.argmin(sizes))
    return PartitionError(
        f"{scheme} partition with alpha={alpha} gave peer {worst} only {int(sizes[worst])} "
        f"examples (min_size={min_size}) in {MAX_DRAWS} draws; "
        "use a larger alpha, fewer peers or a smaller min_size"
    )


# --------------------------------------------------------------------------- schemes


def _iid(n: int, n_peers: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Even random split: sizes differ by at most one."""
    return list(np.array_split(rng.permutation(n), n_peers))


def _cut(indices: np.ndarray, shares: np.ndarray) -> list[np.ndarray]:
    """Split ``indices`` into consecutive pieces proportional to ``shares``."""
    bounds = np.round(np.cumsum(shares)[:-1] * len(indices)).astype(np.int64)
    return np.split(indices, np.clip(bounds, 0, len(indices)))


def _dirichlet(
    labels: np.ndarray, n_peers: int, rng: np.random.Generator, alpha: float, min_size: int
) -> list[np.ndarray]:
    """Per-class Dirichlet shares (Hsu et al. 2019), redrawn until min_size holds."""
    need = _required_size(len(labels), n_peers, min_size, "dirichlet", alpha)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    sizes = np.zeros(n_peers, dtype=np.int64)
    for _ in range(MAX_DRAWS):
        pieces: list[list[np.ndarray]] = [[] for _ in range(n_peers)]
        for idx in by_class:
            shares = rng.dirichlet(np.full(n_peers, alpha))
            for peer, chunk in enumerate(_cut(rng.permutation(idx), shares)):
                pieces[peer].append(chunk)
        parts = [np.concatenate(p) for p in pieces]
        sizes = np.array([len(p) for p in parts])
        if sizes.min() >= need:
            return parts
    raise _redraw_error("dirichlet", alpha, min_size, sizes)


def _quantity(
    n: int, n_peers: int, rng: np.random.Generator, alpha: float, min_size: int
) -> list[np.ndarray]:
    """Dirichlet peer sizes with iid content: skew in quantity, not in labels."""
    need = _required_size(n, n_peers, min_size, "quantity", alpha)
    sizes = np.zeros(n_peers, dtype=np.int64)
    for _ in range(MAX_DRAWS):
        sizes = _largest_remainder(rng.dirichlet(np.full(n_peers, alpha)) * n, n)
        if sizes.min() >= need:
            bounds = np.cumsum(sizes)[:-1]
            return np.split(rng.permutation(n), bounds)
    raise _redraw_error("quantity", alpha, min_size, sizes)


def _largest_remainder(quotas: np.ndarray, total: int) -> np.ndarray:
    """Integers close to ``quotas`` that sum to exactly ``total`` (Hamilton's method)."""
    base = np.floor(quotas + 1e-9).astype(np.int64)
    short = int(total - base.sum())
    if short > 0:
        order = np.argsort(-(quotas - base), kind="stable")
        base[order[:short]] += 1
    return base


def _check_proportions(
    proportions: list[list[float]] | None, n_peers: int, num_classes: int
) -> np.ndarray:
    """Validate the label-skew matrix: one row per peer, one column per class, rows sum to 1."""
    if proportions is None:
        raise PartitionError(
            "the label-skew partition needs proportions: one row per peer of per-class "
            "shares, e.g. [[0.15, 0.85], [0.85, 0.15], [0.5, 0.5]]"
        )
    try:
        mat = np.asarray(proportions, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise PartitionError(
            f"proportions must be a list of equal-length lists of numbers; got {proportions!r}"
        ) from err
    if mat.ndim != 2 or mat.shape[0] != n_peers or mat.shape[1] != num_classes:
        raise PartitionError(
            f"proportions must have {n_peers} rows (one per peer) and {num_classes} columns "
            f"(one per class); got shape {'x'.join(str(d) for d in mat.shape)}"
        )
    if not np.isfinite(mat).all() or (mat < 0).any():
        raise PartitionError("proportions must be finite and >= 0; found a negative value")
    sums = mat.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > PROPORTION_TOLERANCE)
    if len(bad):
        raise PartitionError(
            f"each row of proportions must sum to 1; row {int(bad[0])} sums to {sums[bad[0]]:.6g}"
        )
    return mat


def _skew_allocation(mat: np.ndarray, s: int) -> np.ndarray:
    """Per-peer per-class counts for peer size ``s``; each row sums to exactly ``s``."""
    return np.stack([_largest_remainder(row * s, s) for row in mat])


def _largest_feasible_size(mat: np.ndarray, class_counts: np.ndarray, n: int) -> int:
    """The largest common peer size whose per-class demand the data can supply."""
    col = mat.sum(axis=0)
    n_peers = mat.shape[0]
    with np.errstate(divide="ignore"):
        caps = np.where(col > 0, (class_counts + n_peers) / np.where(col > 0, col, 1), np.inf)
    s = int(min(n // n_peers, np.floor(caps.min())))
    while s > 0 and (_skew_allocation(mat, s).sum(axis=0) > class_counts).any():
        s -= 1
    return s


def _label_skew(
    labels: np.ndarray,
    n_peers: int,
    rng: np.random.Generator,
    proportions: list[list[float]] | None,
) -> list[np.ndarray]:
    """Equal-size peers with prescribed label mixes (as in the Dec-LoRA paper)."""
    num_classes = int(labels.max()) + 1
    mat = _check_proportions(proportions, n_peers, num_classes)
    class_counts = np.bincount(labels, minlength=num_classes)
    s = _largest_feasible_size(mat, class_counts, len(labels))
    alloc = _skew_allocation(mat, s)
    pieces: list[list[np.ndarray]] = [[] for _ in range(n_peers)]
    for c in range(num_classes):
        pool = rng.permutation(np.flatnonzero(labels == c))
        bounds = np.cumsum(alloc[:, c])
        for peer, chunk in enumerate(np.split(pool[: bounds[-1]], bounds[:-1])):
            pieces[peer].append(chunk)
    return [np.concatenate(p) for p in pieces]


def _natural(
    n: int, n_peers: int, rng: np.random.Generator, groups: np.ndarray | None
) -> list[np.ndarray]:
    """Keep each group whole; greedy largest-first balancing of peer sizes."""
    if groups is None:
        raise PartitionError(
            "the natural partition needs groups: one value per example (set data.group_column)"
        )
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) != n:
        raise PartitionError(
            f"groups must have one value per example ({n}); got shape {groups.shape}"
        )
    codes, uniques = pd.factorize(groups, use_na_sentinel=False)
    n_groups = len(uniques)
    if n_groups < n_peers:
        raise PartitionError(
            f"the natural partition needs at least one group per peer; there are "
            f"{n_groups} groups for {n_peers} peers"
        )
    sizes = np.bincount(codes, minlength=n_groups)
    shuffled = rng.permutation(n_groups)
    order = shuffled[np.argsort(-sizes[shuffled], kind="stable")]
    owner = np.empty(n_groups, dtype=np.int64)
    load = np.zeros(n_peers, dtype=np.int64)
    for g in order:
        peer = int(np.argmin(load))
        owner[g] = peer
        load[peer] += sizes[g]
    peer_of_example = owner[codes]
    return [np.flatnonzero(peer_of_example == i) for i in range(n_peers)]

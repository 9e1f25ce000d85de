"""The whole volume's intensity range at scale, exactly as a whole-volume request computes it.

The server's default (and the single-machine chunked client's, ``client.volumes.whole_volume_range``)
is ``np.percentile(volume.astype(float32), [1, 99])`` over every voxel and channel. Sorting a
volume larger than memory is not an option; two passes over the data give the same numbers:

1. every block counts its float32 values by the top 16 bits of an order-preserving key
   (a 65,536-bin histogram, 512 KiB per block, summed);
2. the counts locate the bins of the (at most four) order statistics numpy's linear
   interpolation reads; every block returns its distinct values in those bins with counts
   (few: a bin holds 2^16 adjacent float32 values), merged and walked to the exact ranks.

The percentile is then interpolated with numpy's own arithmetic (``percentile_from_ranks``), so
the result is bit for bit what ``np.percentile`` gives (checked in ``tests/test_dataset_ranges.py``).
NaN voxels are not supported (numpy would return NaN and the server its per-chunk default).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

PERCENTILES = (1.0, 99.0)
PREFIX_BITS = 16


def order_keys(values: np.ndarray) -> np.ndarray:
    """float32 -> uint32 keys in the same order as the values (sign flipped, negatives inverted)."""
    # + 0 turns -0.0 into +0.0: np.unique merges the two, so they must share one bin.
    bits = (np.ascontiguousarray(values, dtype=np.float32).reshape(-1) + np.float32(0)).view(np.uint32)
    return np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))


def prefix_histogram(values: np.ndarray) -> np.ndarray:
    """Counts ``[65536]`` int64 of the values' key prefixes (pass 1 of one block)."""
    return np.bincount(order_keys(values) >> (32 - PREFIX_BITS), minlength=1 << PREFIX_BITS).astype(np.int64)


def values_in_prefixes(values: np.ndarray, prefixes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct float32 values whose key prefix is one of ``prefixes``, and their counts (pass 2)."""
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    selected = flat[np.isin(order_keys(flat) >> (32 - PREFIX_BITS), np.asarray(prefixes, dtype=np.uint32))]
    return np.unique(selected, return_counts=True)


def ranks_needed(count: int, percentiles=PERCENTILES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy's linear method: virtual index, and the ranks below and above it, per percentile."""
    quantiles = np.true_divide(np.asarray(percentiles, dtype=np.float64), 100)
    virtual = (count - 1) * quantiles
    previous = np.floor(virtual)
    following = np.minimum(previous + 1, count - 1)
    return virtual, previous.astype(np.int64), following.astype(np.int64)


def percentile_from_ranks(virtual: np.ndarray, below: np.ndarray, above: np.ndarray) -> np.ndarray:
    """numpy's ``_lerp`` with its types: float32 order statistics, float64 weights."""
    gamma = np.asanyarray(virtual - np.floor(virtual), dtype=virtual.dtype)
    below, above = np.asarray(below, dtype=np.float32), np.asarray(above, dtype=np.float32)
    difference = above - below
    result = np.add(below, difference * gamma)
    np.subtract(above, difference * (1 - gamma), out=result, where=gamma >= 0.5, casting="unsafe",
                dtype=type(result.dtype))
    return result


def exact_percentiles(blocks: Iterable, run: Callable[[Callable, list], list] | None = None,
                      percentiles=PERCENTILES) -> np.ndarray:
    """``np.percentile(all voxels as float32, percentiles)`` from ``blocks`` (callables that
    each return one block's voxels) without holding more than one block at a time.

    Args:
        run: ``run(function, blocks) -> [function(block()) ...]``, e.g. over a Dask cluster;
            default: one after another here.
    """
    blocks = list(blocks)
    run = run or (lambda function, items: [function(item) for item in items])
    histogram = np.sum(run(block_histogram, blocks), axis=0)
    count = int(histogram.sum())
    if count == 0:
        raise ValueError("no voxels to take percentiles of")
    virtual, below, above = ranks_needed(count, percentiles)
    cumulative = np.cumsum(histogram)
    ranks = np.unique(np.concatenate([below, above]))
    bins = {int(r): int(np.searchsorted(cumulative, r, side="right")) for r in ranks}
    prefixes = tuple(sorted(set(bins.values())))
    pairs = run(lambda block: block_values(block, prefixes), blocks)
    values, counts = merge_counts(pairs)
    value_at = {}
    for rank, prefix in bins.items():
        first_rank_in_bin = int(cumulative[prefix - 1]) if prefix else 0
        in_bin = (order_keys(values) >> (32 - PREFIX_BITS)) == prefix
        positions = np.cumsum(counts[in_bin])
        value_at[rank] = values[in_bin][int(np.searchsorted(positions, rank - first_rank_in_bin, side="right"))]
    return percentile_from_ranks(virtual, [value_at[int(r)] for r in below], [value_at[int(r)] for r in above])


def block_histogram(block: Callable[[], np.ndarray]) -> np.ndarray:
    return prefix_histogram(block())


def block_values(block: Callable[[], np.ndarray], prefixes: tuple[int, ...]):
    return values_in_prefixes(block(), prefixes)


def merge_counts(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values (ascending) and summed counts of several blocks' (values, counts)."""
    values = np.concatenate([v for v, _ in pairs]) if pairs else np.zeros(0, np.float32)
    counts = np.concatenate([c for _, c in pairs]) if pairs else np.zeros(0, np.int64)
    distinct, inverse = np.unique(values, return_inverse=True)
    return distinct, np.bincount(inverse, weights=counts, minlength=len(distinct)).astype(np.int64)


def intensity_range(blocks: Iterable, run=None) -> tuple[float, float] | None:
    """The server's default window over the whole volume (its 1st..99th percentile, or its
    min..max where those coincide), or None when it is constant (then each request uses the
    server's own default, as a whole-volume request would)."""
    lowest, low, high, highest = (float(v) for v in exact_percentiles(blocks, run, percentiles=(0.0, *PERCENTILES, 100.0)))
    if low == high:
        low, high = lowest, highest
    return (low, high) if low < high else None

"""Tests of ucpjax.packing: bit-exact round trips, Huffman optimality, real params."""

import math
import pathlib

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucpjax import huffman, int8_grid, measure, models, packing
from ucpjax.rules import LayerRule


def _assert_same(tree, decoded):
    names = sorted(packing._flatten(tree))
    assert [n for n, _ in names] == [n for n, _ in sorted(packing._flatten(decoded))]
    for (_, a), (_, b) in zip(names, sorted(packing._flatten(decoded))):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()  # bit for bit, NaN and -0.0 included


def _clustered(seed, shape, k, density, dtype=np.float32):
    """Sparse tensor whose non-zeros take k distinct values."""
    rng = np.random.default_rng(seed)
    codebook = rng.normal(size=k).astype(dtype)
    codebook[codebook == 0] = 1  # a zero centroid would shrink k
    values = codebook[rng.integers(0, k, size=shape)]
    return np.where(rng.random(shape) < density, values, 0).astype(dtype)


shapes = st.one_of(
    st.lists(st.integers(0, 12), min_size=0, max_size=3).map(tuple),  # incl. () and empty
    st.integers(300, 3000).map(lambda n: (n,)),  # room for gaps longer than 255
)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), shape=shapes, k=st.integers(1, 40),
       density=st.sampled_from([0.0, 0.002, 0.05, 0.3, 1.0]),
       dtype=st.sampled_from([np.float32, np.float16, np.float64]),
       coded=st.sampled_from([None, True]))
def test_round_trip_is_bit_exact(seed, shape, k, density, dtype, coded):
    kernel = _clustered(seed, shape, k, density, dtype)
    params = {"Dense_0": {"kernel": kernel, "bias": np.arange(3, dtype=np.float32)},
              "Conv_0": {"kernel": _clustered(seed + 1, (3, 3, 1, 4), 2, 0.5)}}
    data = packing.encode(params, coded=coded)
    _assert_same(params, packing.decode(data))
    assert packing.size_breakdown(params, coded=coded)["total"] == len(data)


def test_edge_cases_round_trip_coded():
    one = np.array([2.5], np.float32)
    params = {
        "empty": {"kernel": np.zeros((0, 5), np.float32)},
        "zeros": {"kernel": np.zeros((40, 30), np.float32)},
        "k1": {"kernel": np.where(np.arange(500) % 7 == 0, 0.25, 0).astype(np.float32)},
        "single": {"kernel": one, "scalar": np.float32(3.0)},
        "long_gap": {"kernel": np.zeros(100_000, np.float32)},
        "signs": {"kernel": np.array([-0.0, 0.0, np.nan, -np.inf, 1e-45], np.float32)},
        "ints": {"kernel": np.array([[0, 3], [-2, 0]], np.int8)},
    }
    params["long_gap"]["kernel"][[0, 70_000, 99_999]] = [1.0, -1.0, 1.0]
    data = packing.encode(params, coded=True)
    _assert_same(params, packing.decode(data))
    layers = packing.size_breakdown(params, coded=True)["layers"]
    assert layers["zeros/kernel"]["gaps"] == layers["zeros/kernel"]["indices"] == 0
    assert layers["k1/kernel"]["indices"] == 0  # one symbol: implied by the table
    assert layers["k1/kernel"]["codebook"] == 4


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_long_gaps_use_filler_entries(bits):
    flat = np.zeros(2000, np.uint32)
    positions = [0, 1, 600, 1999]
    flat[positions] = [7, 9, 7, 9]
    gaps, index, codebook = packing.sparse_entries(flat, bits)
    assert gaps.max() < 2**bits
    assert list(codebook) == [7, 9]
    # Entries with index k are fillers at zero positions; the others are the non-zeros.
    entry_positions = np.cumsum(gaps + 1) - 1
    assert list(entry_positions[index < len(codebook)]) == positions
    assert np.all(flat[entry_positions[index == len(codebook)]] == 0)
    expected_fillers = sum(g >> bits for g in np.diff(positions, prepend=-1) - 1)
    assert np.sum(index == len(codebook)) == expected_fillers


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 60), min_size=0, max_size=400),
       st.integers(0, 2))
def test_huffman_round_trip_and_never_worse_than_fixed_width(symbols, skew):
    symbols = np.asarray(symbols, np.int64) >> skew  # shifts make some symbols frequent
    freqs = np.bincount(symbols, minlength=61)
    lengths = huffman.huffman_code_lengths(freqs)
    data = huffman.huffman_encode(symbols, lengths)
    np.testing.assert_array_equal(huffman.huffman_decode(data, lengths, len(symbols)), symbols)
    used = np.count_nonzero(freqs)
    if used > 1:
        assert sum(2.0 ** -lengths[lengths > 0]) == 1.0  # Kraft: a complete prefix code
    bits = int(freqs @ lengths) if used > 1 else 0
    fixed = len(symbols) * math.ceil(math.log2(used)) if used > 1 else 0
    assert bits <= fixed
    assert len(data) == math.ceil(bits / 8)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), k=st.integers(1, 64),
       density=st.sampled_from([0.01, 0.1, 0.5]))
def test_coded_streams_not_larger_than_fixed_width(seed, k, density):
    kernel = _clustered(seed, (60, 50), k, density)
    breakdown = packing.size_breakdown({"k": kernel}, rules=(LayerRule(pattern="k"),), coded=True)
    layer = breakdown["layers"]["k"]
    bits = layer["gap_bits"]
    scan = kernel.T if layer["by_channel"] else kernel  # unit after unit, or input after input
    gaps, index, codebook = packing.sparse_entries(packing._as_bits(scan), bits)
    n = layer["entries"]
    if n == kernel.size:  # an entry at every position, a zero as a filler with no gap
        assert layer["gaps"] == 0
        used = len(np.unique(kernel))
    else:
        assert n == len(gaps)
        assert layer["gaps"] <= math.ceil(n * bits / 8)
        # Symbols used: the k centroids, plus the filler zero when there are fillers.
        used = len(np.unique(index))
    fixed_width = math.ceil(math.log2(used)) if used > 1 else 0
    assert layer["indices"] <= math.ceil(n * fixed_width / 8)
    assert layer["codebook"] == 4 * len(codebook)


@pytest.fixture(scope="module")
def lenet300():
    model = models.create("lenet300")
    return jax.tree.map(np.asarray, models.init(model, (28, 28, 1))["params"])


def test_dense_kernel_is_stored_raw_with_small_overhead(lenet300):
    params = lenet300
    data = packing.encode(params)
    _assert_same(params, packing.decode(data))
    assert len(data) <= measure.float32_bytes(params) + 200


def test_pruned_clustered_lenet300_round_trip_and_size(lenet300):

    def compress(w):
        if w.ndim != 2:
            return w
        w = np.where(np.abs(w) < np.quantile(np.abs(w), 0.92), 0, w)
        centroids = np.linspace(w.min(), w.max(), 16).astype(np.float32)
        return np.where(w == 0, 0, centroids[np.abs(w[..., None] - centroids).argmin(-1)])

    params = jax.tree.map(lambda w: compress(w).astype(np.float32), lenet300)
    data = packing.encode(params)
    _assert_same(params, packing.decode(data))
    breakdown = packing.size_breakdown(params)
    assert breakdown["total"] == len(data)
    # 8% of the weights, ~4-bit indices plus relative-index gaps and the raw biases:
    # Deep Compression reports ~40x for LeNet-300-100 at this density.
    assert measure.float32_bytes(params) / len(data) > 30
    dense_0 = breakdown["layers"]["Dense_0/kernel"]
    assert dense_0["raw"] == 0 and dense_0["codebook"] <= 16 * 4


def test_rejects_bad_files():
    data = packing.encode({"a": {"kernel": np.ones((4, 4), np.float32)}})
    with pytest.raises(ValueError, match="magic"):
        packing.decode(b"XXXX" + data[4:])
    with pytest.raises(ValueError, match="truncated"):
        packing.decode(data[:-3])


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(1, 16), density=st.floats(0.05, 1.0),
       channels=st.integers(1, 40), bits=st.integers(2, 8))
def test_per_channel_books_round_trip_bit_exact_and_beat_the_value_book(
        seed, k, density, channels, bits):
    from ucpjax import quantize

    # A weight-shared conv with BatchNorm folded in (each channel scaled), then QAT's grid.
    rng = np.random.default_rng(seed)
    shared = _clustered(seed, (3, 3, 8, channels), k, density)
    folded = shared * rng.uniform(0.2, 5.0, channels).astype(np.float32)
    tree = {"Conv_0": {"kernel": folded, "bias": rng.normal(size=channels).astype(np.float32)}}
    config = quantize.QuantizeConfig(weight_bits=bits)
    tree = jax.tree.map(np.asarray, quantize.quantize_weights(tree, config))
    kernel = tree["Conv_0"]["kernel"]
    columns = kernel.reshape(-1, channels).T
    assert max(np.unique(c[c != 0]).size for c in columns) <= k
    data = packing.encode(tree)
    _assert_same(tree, packing.decode(data))
    # Found on its own grid (or on a finer one it also lies on): the layer grid,
    # which QAT gives a weight-shared conv, or the converter's.
    assert int8_grid.layer_grid(kernel) is not None or int8_grid.channel_grid(kernel)
    value_book = packing._best_coding(packing._value_book(packing._as_bits(kernel)))[0]
    stored = packing.size_breakdown(tree)["layers"]["Conv_0/kernel"]["total"]
    assert stored <= len(packing._string("Conv_0/kernel")) + 16 + value_book


# Pruned densities (a dense layer of Laplace codes ties with zlib: both reach the
# codes' entropy, and the book of codes costs what zlib's tables do).
@pytest.mark.parametrize("density", [0.3, 0.6])
def test_an_unclustered_int8_conv_stores_one_book_and_beats_zipping_its_codes(density):
    import zlib

    from ucpjax import quantize

    # A pruned conv quantized without clustering: most of its int8 codes occur in
    # every channel, so per-channel books would repeat them channel after channel.
    rng = np.random.default_rng(0)
    kernel = rng.laplace(size=(3, 3, 64, 64)).astype(np.float32)
    kernel = np.where(rng.random(kernel.shape) < density, kernel, 0).astype(np.float32)
    tree = {"Conv_0": {"kernel": kernel}}
    tree = jax.tree.map(np.asarray, quantize.quantize_weights(
        tree, quantize.QuantizeConfig(weight_bits=8)))
    data = packing.encode(tree)
    _assert_same(tree, packing.decode(data))
    stored = packing.size_breakdown(tree)["layers"]["Conv_0/kernel"]
    assert stored["codebook"] <= 255 + 4 * 64  # one book of codes, a scale per channel
    _, scales, codes = int8_grid.channel_grid(tree["Conv_0"]["kernel"])
    per_channel = packing._best_coding(packing._channel_book(tree["Conv_0"]["kernel"]))[0]
    assert len(data) < per_channel
    # What a zipped .tflite holds for this tensor: its int8 codes and float32 scales.
    assert len(data) < len(zlib.compress(codes.tobytes() + scales.tobytes(), 9))


def test_a_mostly_dense_leaf_stores_no_gaps():
    # An unpruned layer's few zero codes would cost a bit per weight as gaps (Huffman's
    # shortest code): each position becomes an entry, a zero a filler with no gap.
    kernel = _clustered(0, (3, 3, 32, 32), 16, 0.97)
    tree = {"Conv_0": {"kernel": kernel}}
    _assert_same(tree, packing.decode(packing.encode(tree)))
    stored = packing.size_breakdown(tree)["layers"]["Conv_0/kernel"]
    assert stored["gaps"] == 0 and stored["entries"] == kernel.size
    # Within 0.1 bit per weight of the entropy of the values and zeros.
    _, counts = np.unique(kernel, return_counts=True)
    entropy_bytes = -(counts * np.log2(counts / kernel.size)).sum() / 8
    assert stored["indices"] < entropy_bytes + kernel.size / 8 * 0.1
    # A pruned leaf still codes its gaps.
    sparse = {"Conv_0": {"kernel": _clustered(0, (3, 3, 32, 32), 16, 0.3)}}
    assert packing.size_breakdown(sparse)["layers"]["Conv_0/kernel"]["gaps"] > 0


def test_channel_grid_takes_a_scale_an_ulp_from_numpys_quotient():
    # A model trained on a GPU: XLA divides to within an ulp, so a channel's codes *
    # scale can hold a peak whose quotient peak / 127 is a float next to that scale.
    rng = np.random.default_rng(0)
    candidates = np.float32(1e-3) * rng.uniform(1, 4, 20_000).astype(np.float32)
    peaks = candidates * np.float32(127)
    odd = candidates[peaks / np.float32(127) != candidates][:8]
    assert len(odd) == 8  # such scales exist (a few in a thousand)
    codes = rng.integers(-126, 127, (3, 3, 4, 8))
    codes[0, 0, 0] = 127  # each channel's peak on the grid's end, as QAT puts it
    kernel = codes.astype(np.float32) * odd
    bits, scales, found = int8_grid.channel_grid(kernel)
    assert bits == 8 and np.array_equal(found.reshape(codes.shape), codes)
    assert np.array_equal(scales, odd)
    tree = {"Conv_0": {"kernel": kernel}}
    _assert_same(tree, packing.decode(packing.encode(tree)))


def _by_unit(shape, channel_axis_grid=False):
    """A kernel whose zeros follow its inputs: each unit (last axis) keeps a run of
    consecutive inputs, as a first layer's units keep a digit's central pixels."""
    rng = np.random.default_rng(0)
    rows = int(np.prod(shape[:-1]))
    flat = np.zeros((rows, shape[-1]), np.float32)
    for unit in range(shape[-1]):
        start = rng.integers(0, rows - rows // 8)
        flat[start:start + rows // 8, unit] = rng.choice([-2.0, -1.0, 1.0, 3.0], rows // 8)
    if channel_axis_grid:  # codes times a scale per channel: the converter's int8 grid
        codes = np.where(flat != 0, rng.integers(-127, 128, size=flat.shape), 0)
        codes[np.argmax(flat != 0, axis=0), np.arange(shape[-1])] = 127  # each channel's peak
        flat = (codes * np.linspace(0.01, 0.02, shape[-1], dtype=np.float32)).astype(np.float32)
    return flat.reshape(shape)


@pytest.mark.parametrize("shape,grid", [((400, 30), False), ((5, 5, 8, 16), True)])
def test_unit_after_unit_scan_is_chosen_when_smaller_and_round_trips(shape, grid):
    kernel = _by_unit(shape, grid)
    assert not grid or int8_grid.channel_grid(kernel) is not None  # per-channel books
    rules = (LayerRule(pattern="kernel"),)
    layer = packing.size_breakdown({"kernel": kernel}, rules=rules)["layers"]["kernel"]
    assert layer["by_channel"] == 1
    data = packing.encode({"kernel": kernel}, rules=rules)
    _assert_same({"kernel": kernel}, packing.decode(data))
    # Stored input after input, the same entries cost more.
    as_stored = packing._best_coding(packing._value_book(packing._as_bits(kernel)))[0]
    assert layer["total"] - layer["header"] < as_stored


def test_version_1_files_still_decode():
    """``tests/data/packed_v1.ucpj`` was written by the version-1 encoder (one byte per
    Huffman code length) from the tree below."""
    rng = np.random.default_rng(0)
    w = np.where(rng.random((40, 30)) < 0.2,
                 rng.choice(np.float32([-0.5, 0.25, 1.0]), (40, 30)), 0).astype(np.float32)
    b = rng.normal(size=30).astype(np.float32)
    data = (pathlib.Path(__file__).parent / "data" / "packed_v1.ucpj").read_bytes()
    assert data[4] == 1
    _assert_same({"Dense_0": {"kernel": w, "bias": b}}, packing.decode(data))

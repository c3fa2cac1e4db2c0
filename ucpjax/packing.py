"""A real file format for compressed params, laid out as Deep Compression stores layers.

Each selected leaf (kernels by default) is stored as a sparse, weight-shared
tensor (Han et al., 2016, section 4):

* the flattened positions of its non-zero weights as *relative indices*: the
  number of zeros before each entry, in a fixed bit width ``b`` (1..8, chosen
  per leaf for the smallest total). The positions run in the array's order or
  output channel by output channel (the last axis first), whichever codes
  smaller: a first layer's zeros follow its inputs (an MNIST digit's border
  pixels), so its kernel codes smaller one unit's weights after another. A
  gap longer than ``2**b - 1`` is bridged by *filler* entries (gap
  ``2**b - 1``, cluster index ``k``, which stands for an exact zero). As the
  gaps are then Huffman-coded, ``b`` sets the alphabet (``2**b`` gap symbols)
  and so the trade between fillers and code lengths. A mostly dense leaf
  (an unpruned layer whose int8 grid rounds a few weights to zero) can
  instead give every position an entry, a zero a filler with gap 0: its gap
  stream is then one symbol and costs nothing, where its gaps would cost
  Huffman's shortest code, a bit per entry;
* one cluster index per entry into a per-leaf codebook of the ``k`` distinct
  non-zero values (stored in the leaf's dtype);
* the gap stream and the index stream each Huffman-coded (canonical code; the
  code lengths are stored in the header).

A leaf on a per-output-channel int8 grid (after QAT; ``ucpjax.int8_grid``:
the converter's, or the layer grid of a weight-shared conv) can instead store
one scale per channel and a book of int8 codes per channel: once BatchNorm is
folded into a weight-shared conv, its k shared values differ per channel, and
per-channel books keep every index within k symbols. A leaf on the layer grid
stores one book of codes for the layer and a 2-byte scale per channel instead.
A leaf on the converter's grid that is not weight-shared (a conv quantized
without clustering) holds most of its codes in every channel: it can store one
book of the layer's codes and a float32 scale per channel. Whichever is
smallest is written.

"Zero" and "distinct" compare bit patterns, so ``-0.0`` and NaNs round-trip
exactly. A leaf that is not weight-shared still works: its codebook holds all
its distinct values. Whichever of that and the raw little-endian bytes is
smaller is written (``coded=None``), so a dense float kernel costs its raw size
plus a few header bytes. Leaves that are not selected (biases, BatchNorm
statistics) are raw, except a 1-D float32 leaf that is exactly ``codes * step``
in float32 for one step (biases on ``ucpjax.bias_grid``'s short grid), which
stores the step and its codes in as few bits as they need. Decoding gives the
same arrays bit for bit, with the same dtypes and shapes.

File layout (integers are LEB128 varints unless said otherwise)::

    b"UCPK" | u8 version | varint number of leaves | leaf records
    leaf record: name | dtype name | ndim, dims | u8 kind (0 raw, 1 coded, 2 channel,
                 3 layer, 4 step, 5 codes)
      raw:   size * itemsize bytes
      step:  u8 bits | float32 step | the codes plus 2^(bits-1), ``bits`` bits each,
             least significant bit first; the value is code * step
      coded: u8 b (plus 128 when scanned channel by channel) | k | number of entries
             | gap code lengths | index code lengths | gap stream byte count
             | index stream byte count | codebook (k * itemsize bytes, little-endian)
             | gap stream | index stream
      channel: as coded, but the codebook is u8 bits | one float32 scale per
             output channel | one u8 book size per channel | the books' int8
             codes, channel after channel; k is the largest book, an index
             points into its entry's channel's book and the value is
             code * scale.
      layer: as coded, but the codebook is the layer's k int8 codes | one
             signed bfloat16 scale per output channel (2 bytes, little-endian);
             the value is code * scale.
      codes: as coded, but the codebook is the layer's k int8 codes | one float32
             scale per output channel; the value is code * scale.
    code lengths are a count | u8 width w | the lengths, w bits each, least
    significant bit first; strings are a varint byte count followed by UTF-8.

Only nested dicts (Flax params) are supported; keys must not contain "/".
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np

from ucpjax import bias_grid, int8_grid
from ucpjax.huffman import huffman_code_lengths, huffman_decode, huffman_encode
from ucpjax.rules import DEFAULT_RULES, Rules, rule_for

MAGIC = b"UCPK"
VERSION = 3
RAW, CODED, CHANNEL, LAYER, STEP, CODES = 0, 1, 2, 3, 4, 5
MAX_GAP_BITS = 8


# ---------------------------------------------------------------- sparse entries

def _as_bits(array: np.ndarray) -> np.ndarray:
    """The array's bit patterns as flat unsigned ints (so -0.0 and NaN compare exactly)."""
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return np.ascontiguousarray(array).reshape(-1).view(f"u{array.dtype.itemsize}")


def sparse_entries(flat: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relative-index entries of a flat array of bit patterns.

    Returns:
      ``(gaps, index, codebook)``: per entry the zeros skipped before it (each
      < ``2**bits``) and its codebook index (``len(codebook)`` for a filler zero);
      ``codebook`` holds the distinct non-zero bit patterns, sorted.
    """
    positions, index, codebook = _nonzeros(flat)
    return (*_entries(positions, index, len(codebook), bits), codebook)


def _nonzeros(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of the non-zeros, their codebook indices, and the codebook."""
    positions = np.flatnonzero(flat)
    codebook, index = np.unique(flat[positions], return_inverse=True)
    return positions, index.reshape(-1), codebook


def _entries(positions: np.ndarray, index: np.ndarray, k: int,
             bits: int) -> tuple[np.ndarray, np.ndarray]:
    gaps = np.diff(positions, prepend=-1) - 1
    fillers = gaps >> bits  # each filler entry advances 2**bits positions
    counts = fillers + 1
    last = np.cumsum(counts) - 1
    entry_gaps = np.full(int(counts.sum()), (1 << bits) - 1, np.int64)
    entry_index = np.full(int(counts.sum()), k, np.int64)
    entry_gaps[last] = gaps & ((1 << bits) - 1)
    entry_index[last] = index
    return entry_gaps, entry_index


def _scatter(positions: np.ndarray, index: np.ndarray, codebook: np.ndarray, size: int,
             dtype: np.dtype) -> np.ndarray:
    flat = np.zeros(size, f"u{dtype.itemsize}")
    flat[positions] = codebook[index]
    return flat.view(dtype)


# ---------------------------------------------------------------- byte helpers

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str) -> bytes:
    data = s.encode()
    return _varint(len(data)) + data


def _table(lengths: np.ndarray) -> bytes:
    """Code lengths up to the last used symbol, each in the bits the longest needs."""
    used = np.flatnonzero(lengths)
    count = int(used[-1]) + 1 if len(used) else 0
    width = int(lengths.max(initial=0)).bit_length()
    return _varint(count) + bytes([width]) + _pack_bits(lengths[:count], width)


def _pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Non-negative ints below ``2**bits``, ``bits`` each, least significant bit first."""
    planes = (np.asarray(values, np.int64)[:, None] >> np.arange(bits)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def _unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")
    return (planes[:count * bits].reshape(count, bits).astype(np.int64)
            << np.arange(bits)).sum(axis=1)


def _packed_size(count: int, bits: int) -> int:
    return -(-count * bits // 8)


class _Reader:
    def __init__(self, data: bytes, version: int = VERSION):
        self.stream, self.version = io.BytesIO(data), version

    def take(self, n: int) -> bytes:
        out = self.stream.read(n)
        if len(out) != n:
            raise ValueError("truncated file")
        return out

    def varint(self) -> int:
        n, shift = 0, 0
        while True:
            byte = self.take(1)[0]
            n |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return n

    def string(self) -> str:
        return self.take(self.varint()).decode()

    def table(self) -> np.ndarray:
        if self.version == 1:  # a byte per code length
            return np.frombuffer(self.take(self.varint()), np.uint8).astype(np.int64)
        count, width = self.varint(), self.take(1)[0]
        return _unpack_bits(self.take(_packed_size(count, width)), width, count)


# ---------------------------------------------------------------- leaves

def _stream_bytes(freqs: np.ndarray, lengths: np.ndarray) -> int:
    """Bytes ``huffman_encode`` will write for these symbol counts."""
    return 0 if np.count_nonzero(lengths) <= 1 else -(-int(freqs @ lengths) // 8)


# Scan orders of a coded leaf's non-zeros: the array's, or channel by channel.
AS_STORED, BY_CHANNEL = 0, 1


def _scanned(positions: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Positions in the array's order -> in the channel-by-channel order."""
    channels = shape[-1]
    return (positions % channels) * (int(np.prod(shape)) // channels) + positions // channels


def _unscanned(positions: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of ``_scanned``."""
    rows = int(np.prod(shape)) // shape[-1]
    return (positions % rows) * shape[-1] + positions // rows


class _Book:
    """What a coded record stores besides its streams: the non-zeros' positions (in
    the scan ``order``), their index into the book (``k`` stands for a filler zero),
    and the book's bytes."""

    def __init__(self, kind: int, positions, index, k: int, payload: bytes,
                 order: int = AS_STORED):
        self.kind, self.positions, self.index, self.k = kind, positions, index, k
        self.payload, self.order = payload, order

    def by_channel(self, shape: tuple[int, ...]) -> _Book:
        """The same book with its entries scanned channel by channel."""
        positions = _scanned(self.positions, shape)
        order = np.argsort(positions, kind="stable")
        return _Book(self.kind, positions[order], self.index[order], self.k, self.payload,
                     BY_CHANNEL)

    def every_position(self, size: int) -> _Book:
        """The same book with an entry at every position, a zero as a filler (index
        ``k``) with no gap. The gap stream is then one symbol and costs nothing,
        where a mostly dense leaf's gaps would cost at least a bit per entry."""
        index = np.full(size, self.k, np.int64)
        index[self.positions] = self.index
        return _Book(self.kind, np.arange(size), index, self.k, self.payload, self.order)


def _value_book(bit_patterns: np.ndarray) -> _Book:
    """The leaf's distinct non-zero values, stored in its dtype (kind CODED)."""
    positions, index, codebook = _nonzeros(bit_patterns)
    payload = codebook.astype(codebook.dtype.newbyteorder("<")).tobytes()
    return _Book(CODED, positions, index, len(codebook), payload)


def _channel_book(array: np.ndarray) -> _Book | None:
    """Per-channel books of int8 codes and one scale per channel (kind CHANNEL).

    After BatchNorm is folded into a weight-shared layer and QAT puts it on the
    per-channel int8 grid, each output channel holds at most k codes, but the
    layer as a whole up to k per channel: one book per channel keeps each
    index within k symbols.
    """
    grid = int8_grid.channel_grid(array)
    if grid is None:
        layer = int8_grid.layer_grid(array)
        if layer is None:
            return None
        grid = (8, *layer)
    bits, scales, codes = grid
    flat = codes.reshape(-1)
    positions = np.flatnonzero(flat)
    channel = positions % codes.shape[1]
    books = [np.unique(column[column != 0]) for column in codes.T]
    starts = np.cumsum([0, *(len(b) for b in books)])
    table = np.concatenate(books)
    # An entry's index is its rank in its channel's sorted book: search the keys
    # (channel, code) of the whole table, which sort channel by channel.
    keys = np.repeat(np.arange(len(books)), np.diff(starts)) * 256 + table.astype(np.int64)
    index = np.searchsorted(keys, channel * 256 + flat[positions]) - starts[channel]
    payload = (bytes([bits]) + scales.astype("<f4").tobytes()
               + np.asarray([len(b) for b in books], np.uint8).tobytes() + table.tobytes())
    return _Book(CHANNEL, positions, index, max((len(b) for b in books), default=0), payload)


def _layer_book(array: np.ndarray) -> _Book | None:
    """One book of int8 codes for the layer and a signed bfloat16 scale per channel
    (kind LAYER), for a kernel on the layer grid (``int8_grid.layer_grid``).

    A channel's sign goes into its scale, so channels whose BatchNorm factors differ
    in sign still index one book of at most k codes.
    """
    grid = int8_grid.layer_grid(array)
    if grid is None or np.signbit(array[array == 0]).any():  # -0.0 would come back as 0.0
        return None
    scales, codes = grid
    signs = _channel_signs(codes)
    positions, index, book = _nonzeros((codes.astype(np.int64) * signs).reshape(-1))
    signed = (scales * signs).astype(np.float32)  # an exact sign flip
    short = (signed.view("<u4") >> 16).astype("<u2")  # exact: the scales are bfloat16
    payload = book.astype(np.int8).tobytes() + short.tobytes()
    return _Book(LAYER, positions, index, len(book), payload)


def _codes_book(array: np.ndarray) -> _Book | None:
    """One book of the layer's int8 codes and a float32 scale per channel (kind
    CODES), for a kernel on the converter's per-channel grid."""
    grid = int8_grid.channel_grid(array)
    if grid is None:
        return None
    _, scales, codes = grid
    positions, index, book = _nonzeros(codes.reshape(-1))
    payload = book.astype(np.int8).tobytes() + scales.astype("<f4").tobytes()
    return _Book(CODES, positions, index, len(book), payload)


def _channel_signs(codes: np.ndarray) -> np.ndarray:
    """+1 or -1 per channel (column), so that the signed columns share the fewest codes."""
    sets = [set(column[column != 0].tolist()) for column in codes.T]
    signs = np.ones(len(sets), np.int64)
    seen: set = set()
    for c in sorted(range(len(sets)), key=lambda c: -len(sets[c])):
        flipped = {-x for x in sets[c]}
        if len(flipped & seen) > len(sets[c] & seen):
            signs[c], sets[c] = -1, flipped
        seen |= sets[c]
    return signs


def _coded_header(book: _Book, bits: int, entries: int, gap_lengths, index_lengths,
                  gap_bytes: int, index_bytes: int) -> bytes:
    return (bytes([book.kind, bits | book.order << 7]) + _varint(book.k) + _varint(entries)
            + _table(gap_lengths) + _table(index_lengths)
            + _varint(gap_bytes) + _varint(index_bytes))


def _coded_size(book: _Book, bits: int, cache: dict) -> int:
    """Exact byte count of the coded record body with gap width ``bits`` (no encoding)."""
    gaps, index = _entries(book.positions, book.index, book.k, bits)
    gap_freqs = np.bincount(gaps, minlength=1 << bits)
    gap_lengths = huffman_code_lengths(gap_freqs)
    index_freqs = np.bincount(index, minlength=book.k + 1)
    fillers = int(index_freqs[-1])  # the index code depends on b only through this count
    if fillers not in cache:
        cache[fillers] = huffman_code_lengths(index_freqs)
    index_lengths = cache[fillers]
    gap_bytes = _stream_bytes(gap_freqs, gap_lengths)
    index_bytes = _stream_bytes(index_freqs, index_lengths)
    header = _coded_header(book, bits, len(gaps), gap_lengths, index_lengths,
                           gap_bytes, index_bytes)
    return len(header) + len(book.payload) + gap_bytes + index_bytes


def _coded_parts(book: _Book, bits: int):
    """The coded record body of a leaf with gap width ``bits``, split by part."""
    gaps, index = _entries(book.positions, book.index, book.k, bits)
    gap_lengths = huffman_code_lengths(np.bincount(gaps, minlength=1 << bits))
    index_lengths = huffman_code_lengths(np.bincount(index, minlength=book.k + 1))
    gap_stream = huffman_encode(gaps, gap_lengths)
    index_stream = huffman_encode(index, index_lengths)
    header = _coded_header(book, bits, len(gaps), gap_lengths, index_lengths,
                           len(gap_stream), len(index_stream))
    parts = {"header": header, "codebook": book.payload, "gaps": gap_stream,
             "indices": index_stream}
    return parts, {"gap_bits": bits, "entries": len(gaps),
                   "by_channel": int(book.order == BY_CHANNEL)}


def _best_coding(book: _Book) -> tuple[int, int]:
    """``(size, gap width)`` of the smallest coded record of ``book``."""
    cache = {}
    # With no position skipped every gap is 0, at no cost whatever the width.
    contiguous = len(book.positions) == 0 or book.positions[-1] == len(book.positions) - 1
    widths = (1,) if contiguous else range(1, MAX_GAP_BITS + 1)
    sizes = {bits: _coded_size(book, bits, cache) for bits in widths}
    best = min(sizes, key=sizes.get)  # the smallest total; ties go to the narrowest field
    return sizes[best], best


def _leaf_parts(name: str, array: np.ndarray, code: bool | None, selected: bool = True):
    """A leaf record split into named parts whose concatenation is the record.

    Returns:
      ``(parts, info)``: the parts, and for a coded leaf its gap width and entry count.
    """
    head = (_string(name) + _string(array.dtype.name) + _varint(array.ndim)
            + b"".join(_varint(d) for d in array.shape))
    bit_patterns = _as_bits(array)
    raw = {"header": head + bytes([RAW]),
           "raw": bit_patterns.astype(bit_patterns.dtype.newbyteorder("<")).tobytes()}
    if code is False:
        return raw, {}
    if not selected:
        return _step_parts(head, array) or raw, {}
    raw_size = len(raw["raw"]) + 1
    books = [book for book in (_value_book(bit_patterns), _channel_book(array),
                               _layer_book(array), _codes_book(array)) if book]
    # Each distinct value costs its codebook entry plus a code-length byte: when
    # that alone reaches the raw size (unshared weights), coding cannot win.
    if code is None:
        books = [b for b in books if b.k * (array.dtype.itemsize + 1) < raw_size
                 or b.kind in (CHANNEL, LAYER, CODES)]
    if not books:
        return raw, {}
    if array.ndim >= 2 and array.shape[-1] > 1:
        books += [b.by_channel(array.shape) for b in books]
    books += [b.every_position(array.size) for b in books]
    (size, bits), book = min(((_best_coding(b), b) for b in books), key=lambda c: c[0][0])
    if code is None and raw_size <= size:
        return raw, {}
    parts, info = _coded_parts(book, bits)
    return {"header": head + parts.pop("header"), **parts}, info


def _step_parts(head: bytes, array: np.ndarray) -> dict | None:
    """The STEP record of a leaf on one float32 step, when smaller than raw."""
    grid = bias_grid.read_grid(array)
    if grid is None:
        return None
    bits, step, codes = grid
    packed = _pack_bits(codes + (1 << (bits - 1)), bits)
    if 6 + len(packed) >= array.nbytes:
        return None
    return {"header": head + bytes([STEP, bits]) + np.float32(step).astype("<f4").tobytes(),
            "codebook": packed}


def _flatten(tree, prefix: str = "") -> list[tuple[str, np.ndarray]]:
    if not isinstance(tree, Mapping):
        raise TypeError(f"packing supports nested dicts of arrays, got {type(tree).__name__} "
                        f"at {prefix!r}")
    items = []
    for key in sorted(tree):
        if "/" in str(key):
            raise ValueError(f"key {key!r} contains '/'")
        name = f"{prefix}{key}"
        value = tree[key]
        if isinstance(value, Mapping):
            items.extend(_flatten(value, name + "/"))
        else:
            items.append((name, np.asarray(value)))
    return items


def _records(params, rules: Rules, coded: bool | None):
    for name, array in _flatten(params):
        chosen = rule_for(name, rules) is not None
        yield name, _leaf_parts(name, array, coded, selected=chosen)


# ---------------------------------------------------------------- public API

def encode(params, *, rules: Rules = DEFAULT_RULES, coded: bool | None = None) -> bytes:
    """Serializes a params tree in the Deep Compression layout (see the module docstring).

    Args:
      params: nested dicts of arrays (jax or numpy, any numeric dtype).
      rules: the leaves stored as sparse weight-shared tensors (``ucpjax.rules``,
        the same selection as the stages'); the others are stored raw.
      coded: None stores each selected leaf coded or raw, whichever is smaller;
        True always codes selected leaves, False stores everything raw.

    Returns:
      The file contents.
    """
    records = [part for _, (parts, _) in _records(params, rules, coded)
               for part in parts.values()]
    return MAGIC + bytes([VERSION]) + _varint(len(_flatten(params))) + b"".join(records)


def decode(data: bytes) -> dict:
    """Reads a file written by ``encode``.

    Returns:
      Nested dicts of numpy arrays, bit-for-bit equal to the encoded params.
    """
    import ml_dtypes  # noqa: F401  (registers bfloat16 and friends with numpy)

    if data[:4] != MAGIC:
        raise ValueError("not a ucpjax packed file (bad magic)")
    # Version 1 differs only in its code-length tables (it has no step records and
    # no channel-by-channel scans), version 2 only in lacking codes records, so
    # their files still decode.
    if data[4] not in (1, 2, VERSION):
        raise ValueError(f"unsupported packed file version {data[4]}")
    reader = _Reader(data[5:], data[4])
    tree: dict = {}
    for _ in range(reader.varint()):
        name = reader.string()
        dtype = np.dtype(reader.string())
        shape = tuple(reader.varint() for _ in range(reader.varint()))
        array = _read_leaf(reader, dtype, shape)
        *parents, last = name.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = array
    if reader.stream.read(1):
        raise ValueError("trailing bytes after the last leaf")
    return tree


def _read_leaf(reader: _Reader, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    size = int(np.prod(shape, dtype=np.int64))
    patterns = np.dtype(f"<u{dtype.itemsize}")
    kind = reader.take(1)[0]
    if kind == RAW:
        flat = np.frombuffer(reader.take(size * dtype.itemsize), patterns)
        return flat.astype(patterns.newbyteorder("=")).view(dtype).reshape(shape)
    if kind == STEP:
        bits = reader.take(1)[0]
        if dtype != np.float32 or not 1 <= bits <= 16:
            raise ValueError(f"corrupt file: a step record of {bits} bits, dtype {dtype}")
        step = np.frombuffer(reader.take(4), "<f4").astype(np.float32)[0]
        codes = _unpack_bits(reader.take(_packed_size(size, bits)), bits, size) - (1 << (bits - 1))
        return (codes.astype(np.float32) * step).reshape(shape)
    if kind not in (CODED, CHANNEL, LAYER, CODES):
        raise ValueError(f"unknown leaf kind {kind}")
    # The gap width b (implied by the gap code, kept for readers) and the scan order.
    order = reader.take(1)[0] >> 7
    k, count = reader.varint(), reader.varint()
    gap_lengths, index_lengths = reader.table(), reader.table()
    gap_bytes, index_bytes = reader.varint(), reader.varint()
    if kind == CHANNEL:
        book = _read_channel_book(reader, shape[-1])
    elif kind == LAYER:
        codes = np.frombuffer(reader.take(k), np.int8)
        short = np.frombuffer(reader.take(2 * shape[-1]), "<u2").astype(np.uint32)
        book = (codes, (short << 16).view(np.float32))
    elif kind == CODES:
        codes = np.frombuffer(reader.take(k), np.int8)
        book = (codes, np.frombuffer(reader.take(4 * shape[-1]), "<f4").astype(np.float32))
    else:
        book = np.frombuffer(reader.take(k * dtype.itemsize), patterns)
        book = book.astype(patterns.newbyteorder("="))
    gaps = huffman_decode(reader.take(gap_bytes), gap_lengths, count)
    index = huffman_decode(reader.take(index_bytes), index_lengths, count)
    if count and index.max() > k:
        raise ValueError("corrupt file: cluster index out of range")
    positions = np.cumsum(gaps + 1) - 1
    if len(positions) and positions[-1] >= size:
        raise ValueError("corrupt file: relative indices run past the tensor")
    if order == BY_CHANNEL:
        if len(shape) < 2 or shape[-1] < 1:
            raise ValueError("corrupt file: a channel-by-channel scan of a tensor without channels")
        positions = _unscanned(positions, shape)
    real = index < k  # the others are fillers
    positions, index = positions[real], index[real]
    if kind == CHANNEL:
        return _scatter_channels(positions, index, *book, size).reshape(shape)
    if kind in (LAYER, CODES):
        return _scatter_layer(positions, index, *book, size).reshape(shape)
    return _scatter(positions, index, book, size, dtype).reshape(shape)


def _read_channel_book(reader: _Reader, channels: int):
    """``(scales, counts, codes)`` of a CHANNEL record (its bits byte is implied)."""
    reader.take(1)
    scales = np.frombuffer(reader.take(4 * channels), "<f4").astype(np.float32)
    counts = np.frombuffer(reader.take(channels), np.uint8).astype(np.int64)
    codes = np.frombuffer(reader.take(int(counts.sum())), np.int8)
    return scales, counts, codes


def _scatter_channels(positions, index, scales, counts, codes, size: int) -> np.ndarray:
    channel = positions % len(scales)
    if np.any(index >= counts[channel]):
        raise ValueError("corrupt file: code index past its channel's book")
    starts = np.cumsum(counts) - counts
    flat = np.zeros(size, np.float32)
    flat[positions] = codes[starts[channel] + index].astype(np.float32) * scales[channel]
    return flat


def _scatter_layer(positions, index, codes, scales, size: int) -> np.ndarray:
    flat = np.zeros(size, np.float32)
    flat[positions] = codes[index].astype(np.float32) * scales[positions % len(scales)]
    return flat


def size_breakdown(params, *, rules: Rules = DEFAULT_RULES,
                   coded: bool | None = None) -> dict:
    """Bytes of ``encode(params)`` per leaf and per part.

    Returns:
      ``{"total": int, "header": int, "layers": {name: {"header", "codebook",
      "gaps", "indices", "raw", "total"}}}``; the file header counts under
      ``header`` and the per-leaf Huffman tables, shapes and counts under each
      leaf's ``header``. ``total`` equals ``len(encode(params))``. Coded leaves
      also give ``gap_bits`` (the chosen b) and ``entries`` (non-zeros + fillers).
    """
    layers = {}
    for name, (parts, info) in _records(params, rules, coded):
        entry = dict.fromkeys(("header", "codebook", "gaps", "indices", "raw"), 0)
        for part, data in parts.items():
            entry[part] += len(data)
        entry["total"] = sum(entry.values())
        layers[name] = {**entry, **info}
    header = len(MAGIC) + 1 + len(_varint(len(layers)))
    return {"total": header + sum(e["total"] for e in layers.values()), "header": header,
            "layers": layers}

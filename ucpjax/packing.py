"""A real file format for compressed params, laid out as Deep Compression stores layers.

Each selected leaf (kernels by default) is stored as a sparse, weight-shared
tensor (Han et al., 2016, section 4):

* the flattened positions of its non-zero weights as *relative indices*: the
  number of zeros before each entry, in a fixed bit width ``b`` (1..8, chosen
  per leaf for the smallest total). A gap longer than ``2**b - 1`` is bridged by
  *filler* entries (gap ``2**b - 1``, cluster index ``k``, which stands for an
  exact zero). As the gaps are then Huffman-coded, ``b`` sets the alphabet
  (``2**b`` gap symbols) and so the trade between fillers and code lengths;
* one cluster index per entry into a per-leaf codebook of the ``k`` distinct
  non-zero values (stored in the leaf's dtype);
* the gap stream and the index stream each Huffman-coded (canonical code; the
  code lengths are stored in the header).

"Zero" and "distinct" compare bit patterns, so ``-0.0`` and NaNs round-trip
exactly. A leaf that is not weight-shared still works: its codebook holds all
its distinct values. Whichever of that and the raw little-endian bytes is
smaller is written (``coded=None``), so a dense float kernel costs its raw size
plus a few header bytes. Leaves that are not selected (biases, BatchNorm
statistics) are always raw. Decoding gives the same arrays bit for bit, with
the same dtypes and shapes.

File layout (integers are LEB128 varints unless said otherwise)::

    b"UCPK" | u8 version | varint number of leaves | leaf records
    leaf record: name | dtype name | ndim, dims | u8 kind (0 raw, 1 coded)
      raw:   size * itemsize bytes
      coded: u8 b | k | number of entries | gap code lengths (count, u8 each)
             | index code lengths (count, u8 each) | gap stream byte count
             | index stream byte count | codebook (k * itemsize bytes, little-endian)
             | gap stream | index stream
    strings are a varint byte count followed by UTF-8.

Only nested dicts (Flax params) are supported; keys must not contain "/".
"""

from __future__ import annotations

import heapq
import io
from collections.abc import Mapping

import numpy as np

from ucpjax.rules import DEFAULT_RULES, Rules, rule_for

MAGIC = b"UCPK"
VERSION = 1
RAW, CODED = 0, 1
MAX_GAP_BITS = 8
MAX_CODE_LENGTH = 24
_TABLE_BITS = 16  # codes up to this long decode with one table look-up


# ---------------------------------------------------------------- canonical Huffman

def huffman_code_lengths(freqs: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Optimal prefix-code lengths for symbol frequencies (0 where a symbol is unused).

    A lone used symbol gets length 1 in the table but costs no bits in a stream
    (see ``huffman_encode``). Lengths are capped at ``max_length`` by flattening
    the frequencies, which only matters for extremely skewed inputs.
    """
    freqs = np.asarray(freqs, np.int64)
    lengths = np.zeros(len(freqs), np.int64)
    used = np.flatnonzero(freqs)
    if len(used) == 1:
        lengths[used] = 1
    if len(used) <= 1:
        return lengths
    weights = freqs[used]
    while True:
        depth = _tree_depths(weights)
        if depth.max() <= max_length:
            lengths[used] = depth
            return lengths
        weights = (weights + 1) // 2  # flatten and retry


def _tree_depths(weights: np.ndarray) -> np.ndarray:
    """Leaf depths of the Huffman tree of ``weights`` (at least two of them)."""
    n = len(weights)
    parent = np.zeros(2 * n - 1, np.int64)
    heap = [(int(w), i) for i, w in enumerate(weights)]
    heapq.heapify(heap)
    node = n
    while len(heap) > 1:
        (w1, a), (w2, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent[a] = parent[b] = node
        heapq.heappush(heap, (w1 + w2, node))
        node += 1
    depth = [0] * (2 * n - 1)  # nodes are created after their children: walk back from the root
    parent = parent.tolist()
    for i in range(2 * n - 3, -1, -1):
        depth[i] = depth[parent[i]] + 1
    return np.asarray(depth[:n], np.int64)


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes (as integers) for code lengths, ordered by (length, symbol)."""
    codes = np.zeros(len(lengths), np.int64)
    code, previous = 0, 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - previous
        codes[symbol] = code
        previous = int(lengths[symbol])
        code += 1
    return codes


def huffman_encode(symbols: np.ndarray, lengths: np.ndarray) -> bytes:
    """Packs ``symbols`` with the canonical code of ``lengths``, MSB first, zero-padded."""
    symbols = np.asarray(symbols, np.int64)
    if len(symbols) == 0 or np.count_nonzero(lengths) <= 1:
        return b""  # a lone symbol is implied by the table
    codes, lens = _canonical_codes(lengths)[symbols], np.asarray(lengths)[symbols]
    ends = np.cumsum(lens)
    owner = np.repeat(np.arange(len(symbols)), lens)
    bit = np.arange(ends[-1]) - (ends - lens)[owner]  # position of each bit in its code
    bits = (codes[owner] >> (lens[owner] - 1 - bit)) & 1
    return np.packbits(bits.astype(np.uint8)).tobytes()


def huffman_decode(data: bytes, lengths: np.ndarray, count: int) -> np.ndarray:
    """Reads ``count`` symbols coded by ``huffman_encode`` with the same ``lengths``."""
    lengths = np.asarray(lengths, np.int64)
    used = np.flatnonzero(lengths)
    if count == 0:
        return np.zeros(0, np.int64)
    if len(used) == 0:
        raise ValueError("corrupt file: symbols without a code")
    if len(used) == 1:
        return np.full(count, used[0], np.int64)
    codes = _canonical_codes(lengths)
    width = min(int(lengths.max()), _TABLE_BITS)
    # table[w] for a `width`-bit window w: (symbol, length), or (-1, 0) for longer codes.
    table_sym = np.full(1 << width, -1, np.int64)
    table_len = np.zeros(1 << width, np.int64)
    long_codes = {}
    for s in used:
        n, c = int(lengths[s]), int(codes[s])
        if n <= width:
            lo = c << (width - n)
            table_sym[lo:lo + (1 << (width - n))] = s
            table_len[lo:lo + (1 << (width - n))] = n
        else:
            long_codes[(n, c)] = int(s)
    bits = np.unpackbits(np.frombuffer(data, np.uint8)).astype(np.int64)
    bits = np.concatenate([bits, np.zeros(width, np.int64)])
    # window[p]: the `width` bits starting at bit p, as an integer.
    window = np.zeros(len(bits) - width + 1, np.int64)
    for j in range(width):
        window = (window << 1) | bits[j:len(bits) - width + 1 + j]
    window, table_sym, table_len = window.tolist(), table_sym.tolist(), table_len.tolist()
    bit_list = bits.tolist()
    out, pos = [0] * count, 0
    for i in range(count):
        w = window[pos]
        s = table_sym[w]
        if s >= 0:
            out[i], pos = s, pos + table_len[w]
            continue
        code, n = w, width
        pos += width
        while (n, code) not in long_codes:
            if n >= MAX_CODE_LENGTH:
                raise ValueError("corrupt Huffman stream")
            code, n, pos = (code << 1) | bit_list[pos], n + 1, pos + 1
        out[i] = long_codes[(n, code)]
    if pos > len(bits) - width:
        raise ValueError("truncated Huffman stream")
    return np.asarray(out, np.int64)


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


def _scatter(gaps: np.ndarray, index: np.ndarray, codebook: np.ndarray, size: int,
             dtype: np.dtype) -> np.ndarray:
    positions = np.cumsum(gaps + 1) - 1
    if len(positions) and positions[-1] >= size:
        raise ValueError("corrupt file: relative indices run past the tensor")
    table = np.concatenate([codebook, np.zeros(1, codebook.dtype)])
    flat = np.zeros(size, f"u{dtype.itemsize}")
    flat[positions] = table[index]
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
    """Code lengths up to the last used symbol, one byte each."""
    used = np.flatnonzero(lengths)
    count = int(used[-1]) + 1 if len(used) else 0
    return _varint(count) + np.asarray(lengths[:count], np.uint8).tobytes()


class _Reader:
    def __init__(self, data: bytes):
        self.stream = io.BytesIO(data)

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
        return np.frombuffer(self.take(self.varint()), np.uint8).astype(np.int64)


# ---------------------------------------------------------------- leaves

def _stream_bytes(freqs: np.ndarray, lengths: np.ndarray) -> int:
    """Bytes ``huffman_encode`` will write for these symbol counts."""
    return 0 if np.count_nonzero(lengths) <= 1 else -(-int(freqs @ lengths) // 8)


def _coded_header(bits: int, k: int, entries: int, gap_lengths, index_lengths,
                  gap_bytes: int, index_bytes: int) -> bytes:
    return (bytes([CODED, bits]) + _varint(k) + _varint(entries)
            + _table(gap_lengths) + _table(index_lengths)
            + _varint(gap_bytes) + _varint(index_bytes))


def _coded_size(nonzeros, bits: int, cache: dict) -> int:
    """Exact byte count of the coded record body with gap width ``bits`` (no encoding)."""
    positions, index, codebook = nonzeros
    gaps, index = _entries(positions, index, len(codebook), bits)
    gap_freqs = np.bincount(gaps, minlength=1 << bits)
    gap_lengths = huffman_code_lengths(gap_freqs)
    index_freqs = np.bincount(index, minlength=len(codebook) + 1)
    fillers = int(index_freqs[-1])  # the index code depends on b only through this count
    if fillers not in cache:
        cache[fillers] = huffman_code_lengths(index_freqs)
    index_lengths = cache[fillers]
    gap_bytes = _stream_bytes(gap_freqs, gap_lengths)
    index_bytes = _stream_bytes(index_freqs, index_lengths)
    header = _coded_header(bits, len(codebook), len(gaps), gap_lengths, index_lengths,
                           gap_bytes, index_bytes)
    return len(header) + codebook.nbytes + gap_bytes + index_bytes


def _coded_parts(nonzeros, bits: int):
    """The coded record body of a flat leaf with gap width ``bits``, split by part."""
    positions, index, codebook = nonzeros
    gaps, index = _entries(positions, index, len(codebook), bits)
    gap_lengths = huffman_code_lengths(np.bincount(gaps, minlength=1 << bits))
    index_lengths = huffman_code_lengths(np.bincount(index, minlength=len(codebook) + 1))
    gap_stream = huffman_encode(gaps, gap_lengths)
    index_stream = huffman_encode(index, index_lengths)
    header = _coded_header(bits, len(codebook), len(gaps), gap_lengths, index_lengths,
                           len(gap_stream), len(index_stream))
    codebook_bytes = codebook.astype(codebook.dtype.newbyteorder("<")).tobytes()
    parts = {"header": header, "codebook": codebook_bytes, "gaps": gap_stream,
             "indices": index_stream}
    return parts, {"gap_bits": bits, "entries": len(gaps)}


def _leaf_parts(name: str, array: np.ndarray, code: bool | None):
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
    raw_size = len(raw["raw"]) + 1
    nonzeros = _nonzeros(bit_patterns)
    # Each distinct value costs its codebook entry plus a code-length byte: when
    # that alone reaches the raw size (unshared weights), coding cannot win.
    if code is None and len(nonzeros[2]) * (array.dtype.itemsize + 1) >= raw_size:
        return raw, {}
    cache = {}
    sizes = {bits: _coded_size(nonzeros, bits, cache) for bits in range(1, MAX_GAP_BITS + 1)}
    best = min(sizes, key=sizes.get)  # the smallest total; ties go to the narrowest field
    if code is None and raw_size <= sizes[best]:
        return raw, {}
    parts, info = _coded_parts(nonzeros, best)
    return {"header": head + parts.pop("header"), **parts}, info


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
        yield name, _leaf_parts(name, array, coded if chosen else False)


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
    if data[4] != VERSION:
        raise ValueError(f"unsupported packed file version {data[4]}")
    reader = _Reader(data[5:])
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
    if kind != CODED:
        raise ValueError(f"unknown leaf kind {kind}")
    reader.take(1)  # the gap width b: implied by the gap code, kept for readers
    k, count = reader.varint(), reader.varint()
    gap_lengths, index_lengths = reader.table(), reader.table()
    gap_bytes, index_bytes = reader.varint(), reader.varint()
    codebook = np.frombuffer(reader.take(k * dtype.itemsize), patterns)
    codebook = codebook.astype(patterns.newbyteorder("="))
    gaps = huffman_decode(reader.take(gap_bytes), gap_lengths, count)
    index = huffman_decode(reader.take(index_bytes), index_lengths, count)
    if count and index.max() > k:
        raise ValueError("corrupt file: cluster index out of range")
    return _scatter(gaps, index, codebook, size, dtype).reshape(shape)


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

"""Canonical Huffman codes over small integer alphabets, vectorised with numpy.

The packed file (``ucpjax.packing``) codes its relative indices and cluster
indices with these; a code is stored as its code lengths only (canonical
order: by length, then symbol).
"""

from __future__ import annotations

import heapq

import numpy as np

MAX_CODE_LENGTH = 24
_TABLE_BITS = 16  # codes up to this long decode with one table look-up


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
    if len(used) > 2 ** max_length:
        raise ValueError(f"{len(used)} symbols do not fit codes of at most {max_length} bits")
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

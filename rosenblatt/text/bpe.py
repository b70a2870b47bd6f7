"""Byte-pair encoding over numpy arrays: byte strings in, token ids out (llama.cpp's two BPE loops).

A vocabulary is a list of byte strings; a token's id is its index. Nothing here knows GGUF keys
or token types: the tokenizer (``tokenizer.py``) hands over the strings, the merges or scores,
and gets ids back. Two tokenizer algorithms, both as llama.cpp's ``llama-vocab.cpp`` runs them:

* :class:`ByteLevelBPE` (``llm_tokenizer_bpe_session``, GPT-2 style). A word starts as one symbol
  per byte: the token whose text is the byte's character in GPT-2's byte-level alphabet
  (:data:`BYTE_TO_CHAR`); a byte without such a token never merges and is left out of the
  output. The adjacent pair with the lowest merge rank (its index in the merge list) is merged,
  the leftmost on equal rank, until no adjacent pair is a merge.
* :class:`SentencePieceBPE` (``llm_tokenizer_spm_session``). A fragment starts as its UTF-8
  characters; the adjacent pair whose concatenation is the token with the highest score is
  merged, the leftmost on equal score, until no concatenation is a token. A character left
  without a token becomes its ``<0xXX>`` byte tokens.

Both keep llama.cpp's data structure: a linked list of symbols and a binary heap of candidate
pairs, invalidated lazily (a popped pair whose symbols have changed since is skipped), so a long
word costs O(n log n), not the O(n^2) of rescanning for the best pair. The encoders take many
words (fragments) per call, since a numba call costs microseconds and a prompt has thousands.

Memory. A 150k vocabulary as ``str`` keys of a dict, plus its merges as tuples, is tens of MiB
of small Python objects; here it is a few flat arrays. The strings stay where they are (a view
of the GGUF file, or one packed buffer for a list of ``str``): string ``i`` is
``data[offsets[i] + header : offsets[i + 1]]``, which describes a GGUF string array (``header``
8: each string follows its 8-byte length) as well as a packed buffer (``header`` 0). Lookups go
through open-addressing hash tables of int32 slots (-1 empty, linear probing, at most 60% full;
the size is not rounded up to a power of two, which would double it for Qwen's vocabulary):

* text -> id (:class:`ByteVocab`); on duplicate texts the later id wins, as in llama.cpp's
  ``token_to_id`` map.
* (left id, right id) -> merge index, which is the rank (:class:`ByteLevelBPE`); ``left[m]`` and
  ``right[m]`` hold merge m's pair. The merged token is found by its text when a pair is merged
  rather than stored (an int32 per merge less).

A slot holds the id in its low bits and, in the bits the id does not need (13 for a 262k
vocabulary), a tag from the key's hash: probing past another key's slot, or concluding that a
key is absent, then reads no string, which is what makes lookups of non-tokens (most SPM pair
candidates) cheap. For Qwen2.5 (151,936 tokens, 151,387 merges) all of it is ~3.1 MiB.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numba import njit

# --------------------------------------------------------------------------------------------
# Hash tables
# --------------------------------------------------------------------------------------------

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_MIX1 = np.uint64(0xFF51AFD7ED558CCD)
_MIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_S32 = np.uint64(32)
_S33 = np.uint64(33)
_LOW31 = np.uint64(0x7FFFFFFF)
_LOW32 = np.uint64(0xFFFFFFFF)

#: slots per entry: load <= 0.6, ~1.75 probes for a hit (the tags make the extra ones cheap)
_SLOTS_PER_ENTRY = 5 / 3


def _new_table(n: int) -> tuple[np.ndarray, int]:
    """An empty table for ``n`` entries with ids 0..n-1, and the number of bits an id takes."""
    return np.full(max(8, int(n * _SLOTS_PER_ENTRY) + 1), -1, dtype=np.int32), max(1, (n - 1).bit_length())


@njit(cache=True, nogil=True)
def _fmix(h):
    """MurmurHash3's 64-bit finalizer: every input bit reaches every output bit."""
    h ^= h >> _S33
    h *= _MIX1
    h ^= h >> _S33
    h *= _MIX2
    h ^= h >> _S33
    return h


@njit(cache=True, nogil=True)
def _slot(h, size):
    """A hash's first slot in a table of ``size`` slots: its high 32 bits scaled to [0, size)."""
    return np.int64(((h >> _S32) * np.uint64(size)) >> _S32)


@njit(cache=True, nogil=True)
def _tag(h, id_bits):
    """The bits of a slot above the id: the hash's low 31 bits, shifted down to fit."""
    return np.int64(h & _LOW31) >> id_bits


@njit(cache=True, nogil=True)
def _hash_bytes(key, a0, a1, b0, b1):
    """FNV-1a of key[a0:a1] + key[b0:b1], finalized."""
    h = _FNV_OFFSET
    for i in range(a0, a1):
        h = (h ^ np.uint64(key[i])) * _FNV_PRIME
    for i in range(b0, b1):
        h = (h ^ np.uint64(key[i])) * _FNV_PRIME
    return _fmix(h)


@njit(cache=True, nogil=True)
def _hash_pair(left, right):
    return _fmix((np.uint64(left) << _S32) | (np.uint64(right) & _LOW32))


# --------------------------------------------------------------------------------------------
# Vocabulary: byte string -> id
# --------------------------------------------------------------------------------------------
# The kernels take a vocabulary as one tuple ``voc = (table, id_bits, data, offsets, header)``.

@njit(cache=True, nogil=True)
def _matches(data, start, end, key, a0, a1, b0, b1):
    """True if data[start:end] == key[a0:a1] + key[b0:b1].

    The bytes are compared without an early exit: tokens are short, and a loop that can stop
    anywhere costs a branch misprediction more than the bytes it would skip.
    """
    la = a1 - a0
    if end - start != la + (b1 - b0):
        return False
    diff = 0
    for i in range(la):
        diff |= data[start + i] ^ key[a0 + i]
    start += la
    for i in range(b1 - b0):
        diff |= data[start + i] ^ key[b0 + i]
    return diff == 0


@njit(cache=True, nogil=True)
def _find(voc, key, a0, a1, b0, b1):
    """Id of the token whose bytes are key[a0:a1] + key[b0:b1], or -1."""
    table, id_bits, data, offsets, header = voc
    h = _hash_bytes(key, a0, a1, b0, b1)
    tag = _tag(h, id_bits)
    id_mask = (1 << id_bits) - 1
    size = table.shape[0]
    s = _slot(h, size)
    while True:
        v = np.int64(table[s])
        if v < 0:
            return -1
        t = v & id_mask
        if v >> id_bits == tag and _matches(data, np.int64(offsets[t]) + header, np.int64(offsets[t + 1]),
                                            key, a0, a1, b0, b1):
            return t
        s += 1
        if s == size:
            s = 0


@njit(cache=True, nogil=True)
def _build_vocab(voc, replaced):
    """Enter every string's id into the (empty) table; a later duplicate replaces an earlier one,
    whose bit in ``replaced`` (one bit per id, all 0) is then set."""
    table, id_bits, data, offsets, header = voc
    id_mask = (1 << id_bits) - 1
    size = table.shape[0]
    for t in range(offsets.shape[0] - 1):
        start, end = np.int64(offsets[t]) + header, np.int64(offsets[t + 1])
        h = _hash_bytes(data, start, end, end, end)
        tag = _tag(h, id_bits)
        s = _slot(h, size)
        while True:
            v = np.int64(table[s])
            if v < 0:
                table[s] = (tag << id_bits) | t
                break
            u = v & id_mask
            if v >> id_bits == tag and _matches(data, np.int64(offsets[u]) + header, np.int64(offsets[u + 1]),
                                                data, start, end, end, end):
                table[s] = (tag << id_bits) | t
                replaced[u >> 3] |= np.uint8(1 << (u & 7))
                break
            s += 1
            if s == size:
                s = 0


@njit(cache=True, nogil=True)
def _find_all(voc, keys, key_offsets, out):
    """out[i] = id of the i-th packed key (keys[key_offsets[i]:key_offsets[i + 1]]), or -1."""
    for i in range(key_offsets.shape[0] - 1):
        a0, a1 = np.int64(key_offsets[i]), np.int64(key_offsets[i + 1])
        out[i] = _find(voc, keys, a0, a1, a1, a1)


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view. GGUF arrays are read-only views of the file; handing the kernels only
    read-only inputs gives each kernel one numba type signature, so it compiles once."""
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def _offsets_array(offsets) -> np.ndarray:
    o = np.asarray(offsets)
    if o.ndim != 1 or o.shape[0] < 1 or o.dtype.kind not in "iu":
        raise ValueError("offsets must be a 1-D integer array of n + 1 positions")
    return _readonly(np.ascontiguousarray(o, dtype=np.uint32 if o.dtype == np.uint32 else np.int64))


def pack_strings(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``texts`` as one UTF-8 buffer and the n + 1 offsets of its strings (header 0).

    One encode of the joined text; the byte offsets come from the character offsets by counting
    UTF-8 lead bytes, so no per-string ``bytes`` object is made. Lone surrogates are kept
    (``surrogatepass``), so that any ``str`` has an encoding to look up.
    """
    joined = "".join(texts)
    data = np.frombuffer(joined.encode("utf-8", "surrogatepass"), dtype=np.uint8)
    char_bounds = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)), out=char_bounds[1:])
    if data.shape[0] == len(joined):    # ASCII: characters are bytes
        byte_bounds = char_bounds
    else:
        starts = np.flatnonzero((data & 0xC0) != 0x80)     # where each character's bytes begin
        byte_bounds = np.append(starts, data.shape[0])[char_bounds]
    offsets = byte_bounds.astype(np.uint32) if data.shape[0] < 1 << 32 else byte_bounds
    return _readonly(data), _readonly(offsets)


def _key(text: str | bytes) -> np.ndarray:
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogatepass")
    return np.frombuffer(text, dtype=np.uint8)


class ByteVocab:
    """Token texts as bytes and a hash table text -> id.

    ``data``/``offsets``/``header`` hold the strings (see the module docstring); they are kept
    by reference, not copied.
    """

    __slots__ = ("data", "offsets", "header", "table", "id_bits", "replaced")

    def __init__(self, data: np.ndarray, offsets: np.ndarray, header: int = 0):
        self.data = _readonly(np.ascontiguousarray(data, dtype=np.uint8))
        self.offsets = _offsets_array(offsets)
        self.header = int(header)
        self.table, self.id_bits = _new_table(len(self))
        #: bit t set: a later token has the same text as token t (so t is never looked up)
        self.replaced = np.zeros((len(self) + 7) // 8, dtype=np.uint8)
        _build_vocab(self.kernel_args(), self.replaced)

    @classmethod
    def from_strings(cls, texts: Sequence[str]) -> "ByteVocab":
        return cls(*pack_strings(texts))

    def kernel_args(self) -> tuple:
        """The vocabulary as the kernels take it."""
        return self.table, self.id_bits, self.data, self.offsets, self.header

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    def __getitem__(self, token_id: int) -> bytes:
        """The bytes of a token."""
        if not 0 <= token_id < len(self):
            raise IndexError("token id out of range")
        return self.data[int(self.offsets[token_id]) + self.header:int(self.offsets[token_id + 1])].tobytes()

    def lengths(self, ids: np.ndarray) -> np.ndarray:
        """The byte lengths of the tokens ``ids`` (int64)."""
        ids = np.asarray(ids, dtype=np.int64)
        return self.offsets[ids + 1].astype(np.int64) - self.offsets[ids].astype(np.int64) - self.header

    def lookup(self, text: str | bytes) -> int | None:
        """The id of the token whose text is ``text`` (a ``str`` is looked up as UTF-8), or ``None``."""
        key = _key(text)
        t = self.lookup_all(key, np.array([0, key.shape[0]], dtype=np.uint32))[0]
        return None if t < 0 else int(t)

    def lookup_all(self, keys: np.ndarray, key_offsets: np.ndarray) -> np.ndarray:
        """Ids (int32, -1 for none) of the packed keys ``keys[key_offsets[i]:key_offsets[i + 1]]``."""
        out = np.empty(len(key_offsets) - 1, dtype=np.int32)
        _find_all(self.kernel_args(), _readonly(np.asarray(keys, np.uint8)), _offsets_array(key_offsets), out)
        return out


# --------------------------------------------------------------------------------------------
# Byte-level BPE (gpt2)
# --------------------------------------------------------------------------------------------
# The kernels take the merges as one tuple ``mer = (table, id_bits, left, right)``.

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte value -> the character that stands for it in the vocabulary."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


#: byte value -> its character in GPT-2's byte-level alphabet (printable bytes stand for themselves)
BYTE_TO_CHAR: dict[int, str] = _bytes_to_unicode()
#: the UTF-8 of each byte's character, packed (1 or 2 bytes each; see pack_strings)
_CHAR_DATA, _CHAR_OFFSETS = pack_strings([BYTE_TO_CHAR[b] for b in range(256)])


@njit(cache=True, nogil=True)
def _rank(mer, left, right):
    """The rank (merge index) of the pair (left, right) of token ids, or -1."""
    if left < 0 or right < 0:
        return -1
    table, id_bits, mleft, mright = mer
    h = _hash_pair(left, right)
    tag = _tag(h, id_bits)
    id_mask = (1 << id_bits) - 1
    size = table.shape[0]
    s = _slot(h, size)
    while True:
        v = np.int64(table[s])
        if v < 0:
            return -1
        m = v & id_mask
        if v >> id_bits == tag and mleft[m] == left and mright[m] == right:
            return m
        s += 1
        if s == size:
            s = 0


@njit(cache=True, nogil=True)
def _build_merges(voc, replaced, mdata, moffsets, mheader, mer):
    """Parse the merges "left right" and fill the merge table; return (dropped, first dropped index).

    The separator is the first space after the first byte (llama.cpp: ``word.find(' ', 1)``); a
    merge without one is (whole, ""). A merge whose parts or result are not tokens is dropped
    (left = right = -1). Of two merges of the same pair the first (lowest rank) is kept.

    Vocabularies made by BPE training list each merge's result in merge order (Qwen2.5's merge
    m makes token 256 + m), so the result is first looked for at the id that follows the last
    one found: a sequential read instead of a hash lookup, the costliest of the three.
    """
    table, id_bits, mleft, mright = mer
    n_tokens = voc[3].shape[0] - 1
    vdata, voffsets, vheader = voc[2], voc[3], voc[4]
    size = table.shape[0]
    dropped, first = 0, -1
    delta = 0                              # result id - merge index, as last found
    for m in range(moffsets.shape[0] - 1):
        start, end = np.int64(moffsets[m]) + mheader, np.int64(moffsets[m + 1])
        sep = end
        for i in range(start + 1, end):
            if mdata[i] == 32:
                sep = i
                break
        right_start = min(sep + 1, end)
        left = _find(voc, mdata, start, sep, sep, sep)
        right = _find(voc, mdata, right_start, end, end, end)
        merged = -1
        if left >= 0 and right >= 0:
            g = m + delta                  # the guess; it must be the text's id, not a replaced one
            if 0 <= g < n_tokens and not (replaced[g >> 3] >> (g & 7)) & 1 and _matches(
                    vdata, np.int64(voffsets[g]) + vheader, np.int64(voffsets[g + 1]),
                    mdata, start, sep, right_start, end):
                merged = g
            else:
                merged = _find(voc, mdata, start, sep, right_start, end)
                if merged >= 0:
                    delta = merged - m
        if merged < 0:
            mleft[m] = -1
            mright[m] = -1
            dropped += 1
            if first < 0:
                first = m
            continue
        mleft[m] = left
        mright[m] = right
        h = _hash_pair(left, right)
        tag = _tag(h, id_bits)
        s = _slot(h, size)
        while True:
            v = np.int64(table[s])
            if v < 0:
                table[s] = (tag << id_bits) | m
                break
            u = v & ((1 << id_bits) - 1)
            if v >> id_bits == tag and mleft[u] == left and mright[u] == right:
                break                      # an earlier merge of the same pair keeps its rank
            s += 1
            if s == size:
                s = 0
    return dropped, first


@njit(cache=True, nogil=True)
def _heap_push(keys, vals, n, key, val):
    """Push (key, val) on the min-heap ``keys[:n]`` (``vals`` moves along); return the new size."""
    i = n
    while i > 0:
        parent = (i - 1) >> 1
        if keys[parent] <= key:
            break
        keys[i] = keys[parent]
        vals[i] = vals[parent]
        i = parent
    keys[i] = key
    vals[i] = val
    return n + 1


@njit(cache=True, nogil=True)
def _heap_pop(keys, vals, n):
    """Remove the smallest key of the min-heap ``keys[:n]`` (n > 0); return (key, val, new size)."""
    key, val = keys[0], vals[0]
    n -= 1
    last_key, last_val = keys[n], vals[n]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and keys[c + 1] < keys[c]:
            c += 1
        if last_key <= keys[c]:
            break
        keys[i] = keys[c]
        vals[i] = vals[c]
        i = c
    keys[i] = last_key
    vals[i] = last_val
    return key, val, n


@njit(cache=True, nogil=True)
def _encode_bytelevel(text, bounds, byte_ids, char_data, char_offsets, ignore_merges, voc, mer, out, ends):
    """BPE-encode every word ``text[bounds[k, 0]:bounds[k, 1]]`` into ``out``; ``ends[k]`` is the
    number of ids written once word k is done. Returns the total.

    llama.cpp's ``llm_tokenizer_bpe_session::tokenize`` for each word: the symbols are the word's
    bytes (as their byte-level tokens, -1 if none) in a linked list; the work queue holds each
    candidate pair as the key ``rank << 32 | left position`` (the lowest rank first, then the
    leftmost) and the pair's byte length. A popped pair is stale if its left symbol is gone or
    the two symbols' lengths no longer add up (a symbol only grows by absorbing its right
    neighbour, so this check is exact, as llama.cpp's SPM loop uses it).
    """
    vdata, voffsets, vheader = voc[2], voc[3], voc[4]
    longest = 0
    for k in range(bounds.shape[0]):
        longest = max(longest, bounds[k, 1] - bounds[k, 0])
    sym = np.empty(longest, dtype=np.int32)          # token id of the symbol at each position
    size = np.empty(longest, dtype=np.int64)         # its byte length (0: merged into its left)
    nxt = np.empty(longest, dtype=np.int64)
    prv = np.empty(longest, dtype=np.int64)
    keys = np.empty(3 * longest, dtype=np.int64)     # n - 1 initial pairs + 2 per merge
    vals = np.empty(3 * longest, dtype=np.int64)
    word = np.empty(2 * longest if ignore_merges else 0, dtype=np.uint8)
    n_out = 0
    for k in range(bounds.shape[0]):
        w0, w1 = bounds[k, 0], bounds[k, 1]
        n = w1 - w0
        ends[k] = n_out
        if n <= 0:
            continue
        if ignore_merges:
            # the whole word in the byte-level alphabet; if it is a token it is the output
            m = 0
            for i in range(w0, w1):
                for j in range(np.int64(char_offsets[text[i]]), np.int64(char_offsets[text[i] + 1])):
                    word[m] = char_data[j]
                    m += 1
            t = _find(voc, word, 0, m, m, m)
            if t >= 0:
                out[n_out] = t
                n_out += 1
                ends[k] = n_out
                continue
        for i in range(n):
            sym[i] = byte_ids[text[w0 + i]]
            size[i] = 1
            nxt[i] = i + 1
            prv[i] = i - 1
        nxt[n - 1] = -1
        hn = 0
        for i in range(n - 1):
            r = _rank(mer, sym[i], sym[i + 1])
            if r >= 0:
                hn = _heap_push(keys, vals, hn, (r << 32) | i, 2)
        while hn > 0:
            key, pair_size, hn = _heap_pop(keys, vals, hn)
            i = key & 0xFFFFFFFF
            j = nxt[i]
            if size[i] == 0 or j < 0 or size[i] + size[j] != pair_size:
                continue                               # stale
            a, b = sym[i], sym[j]
            sym[i] = _find(voc, vdata, np.int64(voffsets[a]) + vheader, np.int64(voffsets[a + 1]),
                           np.int64(voffsets[b]) + vheader, np.int64(voffsets[b + 1]))
            size[i] = pair_size                        # merge the right symbol into the left one
            size[j] = 0
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            p, q = prv[i], nxt[i]
            if p >= 0:
                r = _rank(mer, sym[p], sym[i])
                if r >= 0:
                    hn = _heap_push(keys, vals, hn, (r << 32) | p, size[p] + size[i])
            if q >= 0:
                r = _rank(mer, sym[i], sym[q])
                if r >= 0:
                    hn = _heap_push(keys, vals, hn, (r << 32) | i, size[i] + size[q])
        i = 0
        while i >= 0:
            if sym[i] >= 0:                            # bytes without a token are left out
                out[n_out] = sym[i]
                n_out += 1
            i = nxt[i]
        ends[k] = n_out
    return n_out


def _text_key(text) -> np.ndarray:
    if isinstance(text, (bytes, bytearray, str)):
        return _key(text)
    return _readonly(np.ascontiguousarray(text, dtype=np.uint8))


def _bounds_array(bounds, n_bytes: int) -> np.ndarray:
    """[k, 2] int64 (start, end) byte ranges, checked to lie inside the text (the kernels trust them)."""
    if bounds is None:
        return _readonly(np.array([[0, n_bytes]], dtype=np.int64))
    b = np.ascontiguousarray(bounds, dtype=np.int64).reshape(-1, 2)
    if b.size and (b.min() < 0 or b.max() > n_bytes):
        raise ValueError("word bounds outside the text")
    return _readonly(b)


class ByteLevelBPE:
    """GPT-2 byte-level BPE over a :class:`ByteVocab` and a merge list (llama.cpp's gpt2 model).

    ``merge_data``/``merge_offsets``/``merge_header`` hold the merges "left right" as the
    vocabulary holds its strings; they are parsed once and not kept. Merges whose parts or
    result are not in the vocabulary are dropped (llama.cpp could not give their result an id);
    ``n_dropped`` counts them and ``first_dropped`` is the index of the first (or -1).
    ``ignore_merges``: a word that is itself a token is that token (llama3's pre-tokenizers).
    """

    def __init__(self, vocab: ByteVocab, merge_data: np.ndarray, merge_offsets: np.ndarray,
                 merge_header: int = 0, ignore_merges: bool = False):
        self.vocab = vocab
        self.ignore_merges = bool(ignore_merges)
        merge_offsets = _offsets_array(merge_offsets)
        n = merge_offsets.shape[0] - 1
        self.left = np.empty(n, dtype=np.int32)       # merge m is (left[m], right[m]); rank m
        self.right = np.empty(n, dtype=np.int32)
        self.table, self.id_bits = _new_table(n)
        dropped, first = _build_merges(vocab.kernel_args(), vocab.replaced,
                                       _readonly(np.ascontiguousarray(merge_data, dtype=np.uint8)),
                                       merge_offsets, int(merge_header), self.kernel_args())
        self.n_dropped, self.first_dropped = int(dropped), int(first)
        #: byte value -> id of the token that is its byte-level character (-1: none)
        self.byte_ids = _readonly(vocab.lookup_all(_CHAR_DATA, _CHAR_OFFSETS))

    @classmethod
    def from_strings(cls, vocab: ByteVocab, merges: Sequence[str], ignore_merges: bool = False) -> "ByteLevelBPE":
        return cls(vocab, *pack_strings(merges), 0, ignore_merges)

    def kernel_args(self) -> tuple:
        """The merges as the kernels take them."""
        return self.table, self.id_bits, self.left, self.right

    def rank(self, left: int, right: int) -> int | None:
        """The rank of merging token ``left`` with token ``right``, or ``None``."""
        r = _rank(self.kernel_args(), left, right)
        return None if r < 0 else int(r)

    def encode_words(self, text: bytes | str | np.ndarray, bounds) -> tuple[np.ndarray, np.ndarray]:
        """Ids (int32) of the words ``text[bounds[k, 0]:bounds[k, 1]]`` (byte ranges of the raw
        text, not of the byte-level alphabet), each merged on its own, and for each word the
        number of ids up to its end."""
        key = _text_key(text)
        b = _bounds_array(bounds, key.shape[0])
        out = np.empty(key.shape[0], dtype=np.int32)     # at most one id per byte
        ends = np.empty(b.shape[0], dtype=np.int64)
        n = _encode_bytelevel(key, b, self.byte_ids, _CHAR_DATA, _CHAR_OFFSETS, self.ignore_merges,
                              self.vocab.kernel_args(), self.kernel_args(), out, ends)
        return out[:n], ends

    def encode(self, text: bytes | str | np.ndarray, bounds=None) -> np.ndarray:
        """Ids (int32) of the words ``text[bounds[k, 0]:bounds[k, 1]]``; no bounds: the whole text is one word."""
        return self.encode_words(text, bounds)[0]


# --------------------------------------------------------------------------------------------
# SentencePiece BPE (llama)
# --------------------------------------------------------------------------------------------

#: "<0x00>" ... "<0xFF>" (llama.cpp's byte_to_token spelling: upper-case hex), and the 256 single bytes
_HEX_DATA, _HEX_OFFSETS = pack_strings([f"<0x{b:02X}>" for b in range(256)])
_BYTE_DATA = _readonly(np.arange(256, dtype=np.uint8))
_BYTE_OFFSETS = _readonly(np.arange(257, dtype=np.uint32))

#: UTF-8 sequence length by the lead byte's high nibble (llama.cpp's unicode_len_utf8)
_UTF8_LEN = _readonly(np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4], dtype=np.int64))


def _score_keys(scores: np.ndarray) -> np.ndarray:
    """int32 per token, ordered the other way round from its float32 score (equal scores, -0.0 and
    0.0 included, give equal keys): the high half of a work-queue key (see _encode_spm)."""
    s = np.ascontiguousarray(scores, dtype=np.float32) + np.float32(0.0)     # -0.0 -> 0.0: they tie
    bits = s.view(np.uint32).astype(np.int64)
    ordered = np.where(bits >= 1 << 31, 0xFFFFFFFF - bits, bits + (1 << 31))   # increasing with the score
    return (0xFFFFFFFF - ordered - (1 << 31)).astype(np.int32)


@njit(cache=True, nogil=True)
def _spm_add(text, start, length, i, j, voc, score_keys, keys, vals, hn):
    """llama.cpp's ``try_add_bigram(i, j)``: if symbols i and j together are a token, queue the pair
    as the key ``score key << 32 | i`` (the highest score first, then the leftmost pair) with the
    value ``byte length << 32 | token id``. Returns the queue's new size."""
    if i < 0 or j < 0:
        return hn
    a0 = start[i]
    a1 = a0 + length[i] + length[j]           # adjacent symbols are adjacent bytes of the text
    t = _find(voc, text, a0, a1, a1, a1)
    if t < 0:
        return hn
    return _heap_push(keys, vals, hn, (np.int64(score_keys[t]) << 32) | i, ((a1 - a0) << 32) | t)


@njit(cache=True, nogil=True)
def _encode_spm(text, bounds, voc, score_keys, byte_ids, unk, out, ends):
    """llama.cpp's ``llm_tokenizer_spm_session::tokenize`` of each fragment
    ``text[bounds[k, 0]:bounds[k, 1]]`` into ``out``; ``ends[k]`` is the number of ids written
    once fragment k is done. Returns the total.

    Symbols are the UTF-8 characters; a symbol's bytes stay where they are in ``text`` (a merged
    symbol is a longer run of them). A popped pair is stale if its left symbol is gone or the two
    symbols' lengths no longer add up to the pair's (a symbol only grows by absorbing its right
    neighbour, so that check is exact), as in llama.cpp.
    """
    longest = 0
    for k in range(bounds.shape[0]):
        longest = max(longest, bounds[k, 1] - bounds[k, 0])
    start = np.empty(longest, dtype=np.int64)        # a symbol's first byte in text
    length = np.empty(longest, dtype=np.int64)       # its byte length (0: merged into its left)
    tok = np.empty(longest, dtype=np.int32)          # token id of a merged symbol (-1: look it up)
    nxt = np.empty(longest, dtype=np.int64)
    prv = np.empty(longest, dtype=np.int64)
    keys = np.empty(3 * longest, dtype=np.int64)     # n - 1 initial pairs + 2 per merge
    vals = np.empty(3 * longest, dtype=np.int64)
    n_out = 0
    for k in range(bounds.shape[0]):
        f0, f1 = bounds[k, 0], bounds[k, 1]
        n = 0
        pos = f0
        while pos < f1:                              # the UTF-8 characters
            ln = min(_UTF8_LEN[text[pos] >> 4], f1 - pos)
            start[n] = pos
            length[n] = ln
            tok[n] = -1
            prv[n] = n - 1
            nxt[n] = n + 1
            pos += ln
            n += 1
        ends[k] = n_out
        if n == 0:
            continue
        nxt[n - 1] = -1
        hn = 0
        for i in range(1, n):
            hn = _spm_add(text, start, length, i - 1, i, voc, score_keys, keys, vals, hn)
        while hn > 0:
            key, val, hn = _heap_pop(keys, vals, hn)
            i = key & 0xFFFFFFFF
            j = nxt[i]
            if length[i] == 0 or j < 0 or length[i] + length[j] != val >> 32:
                continue                             # stale
            length[i] += length[j]                   # merge the right symbol into the left one
            length[j] = 0
            tok[i] = val & 0xFFFFFFFF
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            hn = _spm_add(text, start, length, prv[i], i, voc, score_keys, keys, vals, hn)
            hn = _spm_add(text, start, length, i, nxt[i], voc, score_keys, keys, vals, hn)
        i = 0
        while i >= 0:                                # llama.cpp's resegment
            t = tok[i]
            s0, s1 = start[i], start[i] + length[i]
            if t < 0:
                t = _find(voc, text, s0, s1, s1, s1)
            if t >= 0:
                out[n_out] = t
                n_out += 1
            else:                                    # a character without a token: its bytes
                for q in range(s0, s1):
                    b = byte_ids[text[q]]
                    if b < 0:
                        b = unk
                    if b >= 0:
                        out[n_out] = b
                        n_out += 1
            i = nxt[i]
        ends[k] = n_out
    return n_out


class SentencePieceBPE:
    """llama.cpp's SPM tokenizer over a :class:`ByteVocab` and per-token scores (float32).

    ``byte_ids``: for each byte the token a character without a token falls back to, as
    llama.cpp's ``byte_to_token``: the ``<0xXX>`` token, else the token whose text is that single
    byte, else (-1) the ``unk`` given to :meth:`encode` (a byte with none of these is left out).
    """

    def __init__(self, vocab: ByteVocab, scores: np.ndarray):
        scores = np.asarray(scores)
        if scores.shape != (len(vocab),):
            raise ValueError(f"expected {len(vocab)} scores, got shape {scores.shape}")
        self.vocab = vocab
        self.score_keys = _readonly(_score_keys(scores))
        hex_ids = vocab.lookup_all(_HEX_DATA, _HEX_OFFSETS)
        byte_ids = vocab.lookup_all(_BYTE_DATA, _BYTE_OFFSETS)
        self.byte_ids = _readonly(np.where(hex_ids >= 0, hex_ids, byte_ids).astype(np.int32))

    def encode_fragments(self, text: bytes | str | np.ndarray, bounds,
                         unk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Ids (int32) of the fragments ``text[bounds[k, 0]:bounds[k, 1]]`` (UTF-8 byte ranges,
        spaces already escaped as the caller wants them), each tokenized on its own, and for
        each fragment the number of ids up to its end."""
        key = _text_key(text)
        b = _bounds_array(bounds, key.shape[0])
        out = np.empty(key.shape[0], dtype=np.int32)     # at most one id per byte
        ends = np.empty(b.shape[0], dtype=np.int64)
        n = _encode_spm(key, b, self.vocab.kernel_args(), self.score_keys, self.byte_ids,
                        -1 if unk is None else int(unk), out, ends)
        return out[:n], ends

    def encode(self, text: bytes | str | np.ndarray, unk: int | None = None) -> np.ndarray:
        """Ids (int32) of ``text`` as one fragment."""
        return self.encode_fragments(text, None, unk)[0]


__all__ = ["BYTE_TO_CHAR", "ByteLevelBPE", "ByteVocab", "SentencePieceBPE", "pack_strings"]


#: the compiled functions a tokenizer of each ``tokenizer.ggml.model`` runs to load and to encode
KERNELS = {"gpt2": (_build_vocab, _build_merges, _encode_bytelevel), "llama": (_build_vocab, _encode_spm)}

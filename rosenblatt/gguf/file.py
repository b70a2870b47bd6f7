"""GGUF file → metadata and quantized tensor views (the "weights" stage).

The file is parsed by the `gguf` package's reader and memory-mapped read-only: tensors stay in
their quantized form as views into the mapping, so opening a model costs page-table entries,
not a copy. Every way a file can be unusable is reported as one :class:`ModelFileError` naming
the file and the field or tensor at fault; nothing here lets a numpy traceback escape.

Metadata arrays are not turned into Python lists at open: a 150k-token vocabulary and its merges
as lists of ``str`` cost ~25 MiB that would stay resident next to the model. ``raw_metadata``
holds them as :class:`StringArray` (strings decoded on access) and read-only numpy views;
``metadata`` is the same mapping with plain lists, built on first use.
"""

from __future__ import annotations

import array
import mmap
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from ..errors import ModelFileError

GGUF_MAGIC = b"GGUF"
#: the fixed header: magic, version (u32), tensor count (u64), metadata count (u64)
HEADER_BYTES = 24
#: the fewest bytes one metadata entry takes (key length u64, a 1-byte key, type u32, a u8 value)
MIN_KV_BYTES = 14
#: the fewest bytes one tensor description takes (name length u64, a 1-byte name, n_dims u32,
#: one u64 dimension, type u32, offset u64)
MIN_TENSOR_INFO_BYTES = 33
#: ggml's limits: a tensor has at most 4 dimensions and a name shorter than 64 bytes
MAX_DIMS = 4
MAX_NAME_BYTES = 63
#: the fewest bytes one element of an array of each type takes (strings: their u64 length)
_MIN_ITEM_BYTES = {GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}
_TYPE_CODES = frozenset(int(t) for t in GGMLQuantizationType)


def _check_counts(path: str, head: bytes, file_size: int) -> None:
    """The header's counts against the bytes that follow it: a file that claims more metadata
    entries or tensors than its size can hold is refused before anything walks them (a count of
    2**64 - 1 would otherwise have the reader create records until memory runs out)."""
    if len(head) < HEADER_BYTES:
        raise ModelFileError(path, "header", f"truncated: {len(head)} bytes, a GGUF header has {HEADER_BYTES}")
    n_tensors, n_kv = struct.unpack_from("<QQ", head, 8)
    room = file_size - HEADER_BYTES
    if n_kv > room // MIN_KV_BYTES:
        raise ModelFileError(path, "header", f"claims {n_kv} metadata entries; the file's {file_size} bytes "
                             f"hold at most {room // MIN_KV_BYTES}")
    room -= n_kv * MIN_KV_BYTES
    if n_tensors > room // MIN_TENSOR_INFO_BYTES:
        raise ModelFileError(path, "header", f"claims {n_tensors} tensors; the file's {file_size} bytes "
                             f"hold at most {room // MIN_TENSOR_INFO_BYTES} next to its metadata")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file, still in its stored (possibly quantized) form.

    ``shape`` is in ggml order: ``shape[0]`` is the length of a row (the contiguous axis, the
    input dimension of a weight matrix) and ``shape[1]`` the number of rows (output dimension).
    ``data`` is a read-only uint8 view of the tensor's bytes inside the file mapping.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def row_len(self) -> int:
        return self.shape[0]

    @property
    def n_rows(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n

    @property
    def n_elements(self) -> int:
        return self.row_len * self.n_rows

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return self.row_len // block * size

    def rows(self) -> np.ndarray:
        """The bytes as a 2-D uint8 array ``[n_rows, row_bytes]`` (a view, no copy)."""
        return self.data.reshape(self.n_rows, self.row_bytes)


class StringArray(Sequence):
    """A GGUF array of strings, decoded on access from the file's bytes (no ``str`` kept).

    ``data`` is the array's bytes as stored (each string an 8-byte little-endian length and its
    UTF-8 bytes); ``offsets[i]`` is where string ``i``'s length field starts and ``offsets[n]``
    the end. Every string was checked to be valid UTF-8 when the file was opened.
    """

    __slots__ = ("_data", "_mv", "_offsets")

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self._data = data
        self._mv = memoryview(data)
        self._offsets = offsets

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("StringArray index out of range")
        return str(self._mv[int(self._offsets[i]) + 8:int(self._offsets[i + 1])], "utf-8")

    def __iter__(self) -> Iterator[str]:
        return iter(self.tolist())

    #: bytes of the length field before each string
    HEADER = 8

    def buffers(self) -> tuple[np.ndarray, np.ndarray, int]:
        """The strings as stored, without copying: (data, offsets, header); string ``i`` is
        ``data[offsets[i] + header:offsets[i + 1]]`` (for kernels that read the bytes)."""
        return self._data, self._offsets, self.HEADER

    def lengths(self) -> np.ndarray:
        """The byte length of every string."""
        return np.diff(self._offsets.astype(np.int64)) - self.HEADER

    def tolist(self) -> list[str]:
        """Every string, decoded in one pass (one UTF-8 decode of the joined bytes, then slices)."""
        n = len(self)
        if n == 0:
            return []
        o = self._offsets.astype(np.int64)
        payload = _payload(self._data, o)
        text = payload.tobytes().decode("utf-8")
        shift = 8 * np.arange(n + 1, dtype=np.int64)
        bounds = np.empty(n + 1, dtype=np.int64)    # string i is payload[bounds[i]:bounds[i + 1]]
        bounds[:-1] = o[:-1] - shift[:-1]
        bounds[-1] = o[-1] - shift[-1]
        if len(text) != payload.size:   # not ASCII: byte offsets -> character offsets
            starts = np.zeros(payload.size + 1, dtype=np.int32 if payload.size < 1 << 31 else np.int64)
            np.cumsum((payload & 0xC0) != 0x80, out=starts[1:])
            bounds = starts[bounds]
        b = bounds.tolist()
        return [text[i:j] for i, j in zip(b, b[1:])]

    def __repr__(self) -> str:
        return f"StringArray({len(self)} strings)"


def _payload(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The strings' bytes of a GGUF string array joined (its 8-byte length fields left out)."""
    inside = np.zeros(data.shape[0] + 1, dtype=np.int8)    # +1 where a length field starts, -1 after it
    inside[offsets[:-1]] = 1
    inside[offsets[:-1] + 8] -= 1
    return data[~np.cumsum(inside[:-1], dtype=np.int8).astype(bool)]


def _check_utf8(data: np.ndarray, offsets: np.ndarray) -> None:
    """Raise UnicodeDecodeError unless every string of a GGUF string array (see StringArray) is UTF-8.

    The strings' bytes joined are decoded in one call; a string that is not valid on its own
    but joins a neighbour into valid UTF-8 starts with a continuation byte (10xxxxxx), since
    the join of valid strings splits only at character starts."""
    _payload(data, offsets).tobytes().decode("utf-8")
    starts = offsets[:-1] + 8
    first = data[starts[starts < offsets[1:]]]
    if ((first & 0xC0) == 0x80).any():
        raise UnicodeDecodeError("utf-8", b"", 0, 1, "a string starts with a continuation byte")


class _CheckedReader(GGUFReader):
    """`gguf.GGUFReader` with every tensor's header checked before the reader maps it.

    The stock reader turns a truncated file or an unknown type code into an anonymous
    reshape or enum error; checking here lets the message name the tensor.
    """

    def __init__(self, path: str):
        self._path = path
        self._plain: np.ndarray | None = None
        self._tensor_names: set[str] = set()
        self.array_values: dict[int, Any] = {}  # id(part) -> decoded array value (see below)
        super().__init__(path, "r")

    # The stock reader slices the np.memmap once per scalar and per string, and memmap slicing
    # is slow (~10 us): a 150k-token vocabulary took 14 s to parse. The two hooks below read
    # the same bytes from a plain ndarray view and decode whole arrays in one pass.
    def _get(self, offset, dtype, count=1, override_order=None):
        if self._plain is None:
            self._plain = np.asarray(self.data)
        count = int(count)
        itemsize = np.dtype(dtype).itemsize
        if count < 0 or offset + itemsize * count > self._plain.shape[0]:
            raise ValueError(f"read of {count} x {np.dtype(dtype).name} at offset {offset} runs past the end of the file")
        arr = self._plain[offset:offset + itemsize * count].view(dtype)
        order = self.byte_order if override_order is None else override_order
        return arr.view(arr.dtype.newbyteorder(order))

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        if self.byte_order != "I":
            raise ValueError("big-endian GGUF files are not supported")
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype = GGUFValueType(int(raw_itype[0]))
        count = int(alen[0])
        start = orig_offs + 12
        buf = self._plain
        min_item = _MIN_ITEM_BYTES.get(itype) or np.dtype(self.gguf_scalar_to_np.get(itype, np.uint8)).itemsize
        if count > (buf.shape[0] - start) // min_item:
            raise ValueError(f"an array of {count} {itype.name} items cannot fit in the "
                             f"{buf.shape[0] - start} bytes left in the file")
        if itype == GGUFValueType.STRING:
            # Only the offsets of the length fields are kept (see StringArray); the strings are
            # checked to be UTF-8 here, all at once, so that a bad file is refused at open.
            mv = memoryview(buf)
            unpack = struct.Struct("<Q").unpack_from
            end_of_file = buf.shape[0]
            offsets = array.array("q")
            push = offsets.append
            off = start
            for _ in range(count):
                if off + 8 > end_of_file:
                    raise ValueError("string array runs past the end of the file")
                push(off)
                off += 8 + unpack(mv, off)[0]
            if off > end_of_file:
                raise ValueError("string array runs past the end of the file")
            push(off)
            rel = np.frombuffer(offsets, dtype=np.int64) - start
            blob = buf[start:off]
            _check_utf8(blob, rel)
            values = StringArray(blob, rel.astype(np.uint32) if off - start < 1 << 32 else rel)
        else:
            nptype = self.gguf_scalar_to_np.get(itype)
            if nptype is None:  # nested arrays: rare, leave them to the stock reader
                return super()._get_field_parts(orig_offs, raw_type)
            blob = self._get(start, nptype, count)
            values = blob
            off = start + blob.nbytes
        self.array_values[id(blob)] = values
        return off - orig_offs, [raw_itype, alen, blob], [2], [GGUFValueType.ARRAY, itype]

    def _get_tensor_info_field(self, orig_offs: int):
        """One tensor description, checked as it is read: the first nonsense record (an empty or
        overlong name, a repeated name, 0 or more than 4 dimensions, an unknown type) ends the
        parse, instead of the reader walking every record a corrupt count claims."""
        index = len(self._tensor_names)
        try:
            field = super()._get_tensor_info_field(orig_offs)
        except ValueError as e:     # a read past the end
            raise ModelFileError(self._path, f"tensor info {index}", " ".join(str(e).split())) from None
        name_len, name_data, n_dims, dims, raw_dtype, _offset = field.parts
        name = bytes(name_data).decode("utf-8", errors="replace")
        where = f"tensor info {index} ({name!r})" if name else f"tensor info {index}"
        if not 0 < int(name_len[0]) <= MAX_NAME_BYTES:
            raise ModelFileError(self._path, where, f"name of {int(name_len[0])} bytes (1 to {MAX_NAME_BYTES} allowed)")
        if name in self._tensor_names:
            raise ModelFileError(self._path, where, "a second tensor of that name")
        if not 1 <= int(n_dims[0]) <= MAX_DIMS:
            raise ModelFileError(self._path, where, f"{int(n_dims[0])} dimensions (1 to {MAX_DIMS} allowed)")
        if int(raw_dtype[0]) not in _TYPE_CODES:
            raise ModelFileError(self._path, f"tensor {name!r}", f"unknown tensor type code {int(raw_dtype[0])}")
        if any(int(d) == 0 for d in dims):
            raise ModelFileError(self._path, f"tensor {name!r}", f"invalid shape {[int(d) for d in dims]}")
        self._tensor_names.add(name)
        return field

    def _build_tensors(self, start_offs: int, fields: list) -> None:  # noqa: D401 (gguf hook)
        file_size = int(self.data.shape[0])
        for field in fields:
            _nlen, name_data, _ndims, dims, raw_dtype, offset = field.parts
            name = bytes(name_data).decode("utf-8", errors="replace")
            qtype = GGMLQuantizationType(int(raw_dtype[0]))     # type and dims checked as read
            shape = [int(d) for d in dims]
            block, size = GGML_QUANT_SIZES[qtype]
            if shape[0] % block:
                raise ModelFileError(
                    self._path, f"tensor {name!r}",
                    f"row length {shape[0]} is not a multiple of the {qtype.name} block size {block}")
            n_elems = 1
            for d in shape:
                n_elems *= d
            n_bytes = n_elems // block * size
            begin = int(start_offs) + int(offset[0])
            if begin + n_bytes > file_size:
                raise ModelFileError(
                    self._path, f"tensor {name!r}",
                    f"data [{begin}, {begin + n_bytes}) lies past the end of the file ({file_size} bytes)")
        super()._build_tensors(start_offs, fields)


def _field_value(reader: _CheckedReader, field) -> Any:
    """A metadata field: a scalar as a Python value (str, int, float, bool); an array as a
    :class:`StringArray` or a read-only numpy view (nested arrays: a list)."""
    if field.types and field.types[0] == GGUFValueType.ARRAY:
        values = reader.array_values.get(id(field.parts[-1]))
        if values is not None:
            return values
    value = field.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _plain(value: Any) -> Any:
    """A raw metadata value as plain Python (arrays become lists)."""
    if isinstance(value, (StringArray, np.ndarray)):
        return value.tolist()
    return value


_MISSING = object()


class GGUFFile:
    """An opened GGUF file: ``metadata`` (key → Python value) and ``tensors`` (name → TensorInfo)."""

    def __init__(self, path: str | os.PathLike, *, load_tensors: bool = True):
        self.path = os.fspath(path)
        try:
            self.file_size = os.path.getsize(self.path)
            with open(self.path, "rb") as fh:
                head = fh.read(HEADER_BYTES)
        except OSError as e:
            raise ModelFileError(self.path, "", f"cannot open: {e.strerror or e}") from None
        magic = head[:4]
        if magic != GGUF_MAGIC:
            raise ModelFileError(self.path, "header", f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
        _check_counts(self.path, head, self.file_size)
        try:
            reader = _CheckedReader(self.path)
        except ModelFileError:
            raise
        except Exception as e:  # the gguf reader signals bad bytes with many exception types
            msg = " ".join(str(e).split()) or type(e).__name__
            raise ModelFileError(self.path, "header", f"malformed or truncated GGUF ({type(e).__name__}: {msg})") from None
        self._reader = reader
        self._raw: dict[str, Any] = {}
        self._metadata: dict[str, Any] | None = None
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self._raw[key] = _field_value(reader, field)
            except Exception as e:
                raise ModelFileError(self.path, f"metadata {key!r}", f"unreadable value ({type(e).__name__})") from None
        self.tensors: dict[str, TensorInfo] = {}
        if load_tensors:
            for t in reader.tensors:
                shape = tuple(int(d) for d in t.shape)
                data = np.asarray(t.data).reshape(-1).view(np.uint8)
                self.tensors[t.name] = TensorInfo(t.name, GGMLQuantizationType(t.tensor_type), shape, data)

    # -- metadata access -------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        """Key → plain Python value (arrays as lists), built on first use."""
        if self._metadata is None:
            self._metadata = {k: _plain(v) for k, v in self._raw.items()}
        return self._metadata

    @metadata.setter
    def metadata(self, value: dict[str, Any]) -> None:
        self._metadata = value

    @property
    def metadata_built(self) -> bool:
        """Whether :attr:`metadata` (the plain-list copy, ~25 MiB for a 150k vocabulary) exists yet."""
        return self._metadata is not None

    @property
    def raw_metadata(self) -> Mapping[str, Any]:
        """Key → value with arrays as stored: :class:`StringArray` or read-only numpy views of
        the file (no list of ``str`` is built; what the engine itself reads)."""
        return self._metadata if self._metadata is not None else MappingProxyType(self._raw)

    def get(self, key: str, default: Any = None) -> Any:
        if self._metadata is not None:
            return self._metadata.get(key, default)
        value = self._raw.get(key, _MISSING)
        return default if value is _MISSING else _plain(value)

    def require(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise ModelFileError(self.path, f"metadata {key!r}", "missing")
        return value

    def evict_metadata_pages(self) -> None:
        """Take the header's pages (metadata, vocabulary) out of this process's resident set.

        They were read when the file was opened; the kernel reads back from the file whatever
        is touched again (a token's text). Saves the header's size (~6 MiB for a 150k
        vocabulary) of resident memory; a no-op where ``madvise`` is unavailable."""
        mm = getattr(self._reader.data, "_mmap", None)
        advice = getattr(mmap, "MADV_DONTNEED", None)
        end = int(self._reader.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
        if mm is None or advice is None or end <= 0 or not hasattr(mm, "madvise"):
            return
        try:
            mm.madvise(advice, 0, end)
        except (OSError, ValueError):
            pass

    def get_int(self, key: str, default: int | None = None, *, minimum: int | None = None,
                maximum: int | None = None) -> int:
        value = self.get(key, default) if default is not None else self.require(key)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ModelFileError(self.path, f"metadata {key!r}", f"expected an integer, got {value!r:.60}")
        value = int(value)
        if minimum is not None and value < minimum:
            raise ModelFileError(self.path, f"metadata {key!r}", f"{value} is below the minimum {minimum}")
        if maximum is not None and value > maximum:
            raise ModelFileError(self.path, f"metadata {key!r}", f"{value} is above the maximum {maximum}")
        return value

    def get_float(self, key: str, default: float | None = None, *, positive: bool = False) -> float:
        value = self.get(key, default) if default is not None else self.require(key)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ModelFileError(self.path, f"metadata {key!r}", f"expected a number, got {value!r:.60}")
        value = float(value)
        if not np.isfinite(value) or (positive and value <= 0):
            raise ModelFileError(self.path, f"metadata {key!r}", f"invalid value {value}")
        return value

    def get_str(self, key: str, default: str | None = None) -> str:
        value = self.get(key, default) if default is not None else self.require(key)
        if not isinstance(value, str):
            raise ModelFileError(self.path, f"metadata {key!r}", f"expected a string, got {value!r:.60}")
        return value

    # -- tensors ---------------------------------------------------------------------------
    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFileError(self.path, f"tensor {name!r}", "missing") from None

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, {len(self.tensors)} tensors, {len(self._raw)} keys)"


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a GGUF file as a plain dict (works on vocab-only files with no tensors)."""
    return GGUFFile(path, load_tensors=False).metadata


__all__ = ["GGUFFile", "StringArray", "TensorInfo", "read_metadata", "GGUFValueType"]

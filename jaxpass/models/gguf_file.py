"""A small, fast reader of GGUF files (metadata and tensor views).

``gguf.GGUFReader`` builds a numpy view per array element of the metadata, which takes ~5 s for a
50k-token vocabulary; this reader parses the header sequentially with ``struct`` (a fraction of a
second) and memory-maps the tensor data. Dequantization still uses ``gguf.quants``, so every
tensor type the gguf package knows is supported. Format: GGUF v2/v3 (llama.cpp's
``docs/gguf.md``), little-endian.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]      # numpy order (llama.cpp's dims reversed): [rows, cols]
    qtype: int                  # gguf.GGMLQuantizationType value
    data: np.ndarray            # raw bytes (uint8 view of the memory map)

    def dequantize(self) -> np.ndarray:
        """float32 values of shape ``shape``."""
        from gguf import GGMLQuantizationType, quants

        qtype = GGMLQuantizationType(self.qtype)
        if qtype == GGMLQuantizationType.F32:
            return self.data.view(np.float32).reshape(self.shape)
        if qtype == GGMLQuantizationType.F16:
            return self.data.view(np.float16).astype(np.float32).reshape(self.shape)
        n_rows = int(np.prod(self.shape[:-1], dtype=np.int64))  # 1 for a vector
        rows = self.data.reshape(n_rows, -1)
        try:
            out = quants.dequantize(rows, qtype)
        except NotImplementedError as e:
            raise ValueError(f"GGUF tensor {self.name!r}: type {qtype.name} cannot be dequantized "
                             f"by the installed gguf package ({e})") from e
        return np.asarray(out, np.float32).reshape(self.shape)


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt):
        size = struct.calcsize(fmt)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def string(self):
        n = self.unpack("<Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.unpack("<I"), self.unpack("<Q")
            if etype in _NUMPY:  # numeric arrays in one read
                dt = np.dtype(_NUMPY[etype]).newbyteorder("<")
                arr = np.frombuffer(self.buf, dt, n, self.pos)
                self.pos += n * dt.itemsize
                return arr.tolist()
            return [self.value(etype) for _ in range(n)]
        if vtype not in _SCALARS:
            raise ValueError(f"GGUF: unknown metadata value type {vtype} at byte {self.pos}")
        return self.unpack(_SCALARS[vtype])


def read_gguf(path: str) -> tuple[dict[str, Any], list[TensorInfo]]:
    """``(metadata, tensors)`` of a GGUF file; tensor data are lazy memory-mapped views."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    mm = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mm))
    if bytes(mm[:4]) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (magic {bytes(mm[:4])!r})")
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    fields: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        fields[key] = cur.value(cur.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
        qtype, offset = cur.unpack("<I"), cur.unpack("<Q")
        infos.append((name, tuple(reversed(dims)), qtype, offset))
    align = int(fields.get("general.alignment", 32))
    start = -(-cur.pos // align) * align
    tensors = []
    for name, shape, qtype, offset in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (KeyError, ValueError) as e:
            raise ValueError(f"GGUF tensor {name!r}: unknown tensor type {qtype}") from e
        nbytes = int(np.prod(shape, dtype=np.int64)) // block * type_size
        begin = start + offset
        tensors.append(TensorInfo(name, shape, qtype, mm[begin:begin + nbytes]))
    return fields, tensors

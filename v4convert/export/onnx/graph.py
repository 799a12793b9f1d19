"""Graph building helpers: a node/initializer collector and an external-data file written tensor by tensor.

Large weights never sit in the ``ModelProto``: :class:`ExternalData` appends each one to ``<model>.onnx.data``
as soon as it is encoded and returns a ``TensorProto`` that only points at it (``data_location = EXTERNAL``,
``location/offset/length``), so memory is bounded by the tensor being written. Stacked expert tensors
(``[E, ...]``) are reserved up front and filled expert by expert (:meth:`ExternalData.reserve`).
Small constants (shapes, axes, scalars) stay inline in the proto.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

ALIGN = 64                # byte alignment of every external tensor (lets onnxruntime mmap aligned data)

_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int64): TensorProto.INT64}


@dataclass
class Reserved:
    """A stacked tensor being filled part by part at ``offset`` of the data file."""
    proto: TensorProto
    offset: int
    nbytes: int
    written: int = 0


class ExternalData:
    """Appends tensors to one data file (opened at ``tmp_path``; ``location`` is the final file name)."""

    def __init__(self, tmp_path: Path, location: str) -> None:
        self.location = location
        self.f: BinaryIO = open(tmp_path, "wb")    # noqa: SIM115 (held across the export; closed by close())
        self.end = 0
        self.n_tensors = 0

    def _proto(self, name: str, shape: tuple[int, ...], dtype: np.dtype, offset: int, nbytes: int) -> TensorProto:
        t = TensorProto()
        t.name = name
        t.data_type = _NP_TO_ONNX[np.dtype(dtype)]
        t.dims.extend(int(d) for d in shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.location), ("offset", str(offset)), ("length", str(nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.n_tensors += 1
        return t

    def _claim(self, nbytes: int) -> int:
        off = -(-self.end // ALIGN) * ALIGN
        self.end = off + nbytes
        return off

    def add(self, name: str, a: np.ndarray | torch.Tensor) -> TensorProto:
        """Write ``a`` now; returns its external ``TensorProto``."""
        arr = np.ascontiguousarray(a.numpy() if isinstance(a, torch.Tensor) else a)
        off = self._claim(arr.nbytes)
        self.f.seek(off)
        self.f.write(arr.tobytes())      # one tensor's bytes; freed on return
        return self._proto(name, arr.shape, arr.dtype, off, arr.nbytes)

    def reserve(self, name: str, shape: tuple[int, ...], dtype) -> Reserved:
        """Claim room for a stacked tensor; fill it in order with :meth:`fill`."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        off = self._claim(nbytes)
        return Reserved(self._proto(name, shape, np.dtype(dtype), off, nbytes), off, nbytes)

    def fill(self, r: Reserved, part: np.ndarray | torch.Tensor) -> None:
        """Write the next ``part`` (e.g. one expert's rows) of ``r``."""
        arr = np.ascontiguousarray(part.numpy() if isinstance(part, torch.Tensor) else part)
        if r.written + arr.nbytes > r.nbytes:
            raise AssertionError(f"{r.proto.name}: parts overflow the reserved {r.nbytes} bytes")
        self.f.seek(r.offset + r.written)
        self.f.write(arr.tobytes())
        r.written += arr.nbytes

    def close(self) -> int:
        """Flush and close; returns the file size."""
        self.f.truncate(self.end)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return self.end


@dataclass
class Graph:
    """Nodes and initializers of one graph; :meth:`op` returns the output names of the node it adds."""
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[TensorProto] = field(default_factory=list)
    _n: int = 0
    _consts: dict[tuple, str] = field(default_factory=dict)

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", name: str | None = None,
           outputs: list[str] | None = None, **attrs) -> list[str]:
        self._n += 1
        base = name or f"{op_type}_{self._n}"
        outs = outputs or [f"{base}/out{i}" if n_out > 1 else f"{base}/out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=base, domain=domain or None, **attrs))
        return outs

    def op1(self, op_type: str, inputs: list[str], **kw) -> str:
        return self.op(op_type, inputs, **kw)[0]

    def const(self, value, dtype=np.int64) -> str:
        """A small inline constant (deduplicated by value), e.g. shapes, axes, scalars."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = f"const_{len(self._consts)}"
            self.initializers.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def init(self, t: TensorProto) -> str:
        self.initializers.append(t)
        return t.name

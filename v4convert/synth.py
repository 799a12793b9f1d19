"""Synthetic checkpoints in the exact published layout of each family (``v4convert synth``).

Tiny presets (DESIGN §8) exercise every path: >= 2 expert groups of >= 2 experts, partial
128-blocks in N (rows like 200, 224), K dims that are multiples of 32 but not of 128, a vocabulary
equal to no layer width. Full-size presets use the published configs (``data/ref``) and, with
``--layers``, write only some blocks with their exact full-size shapes (benchmark inputs).

Values are deterministic per (seed, tensor name) and sane: FP8 blocks decode to weights of std
~0.02 (norm weights ~1, biases ~0), FP4 experts use all 16 codes with E8M0 scales near 2^-6.
Writing streams tensor by tensor (and row chunk by row chunk), so memory stays bounded.
"""
from __future__ import annotations

import copy
import json
import math
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from v4convert.formats.safetensors_io import PlannedTensor, write_streaming
from v4convert.formats.sharding import group_in_order

from .families.layout import FP8_BLOCK, MXFP4_BLOCK, Arch, Slot, inventory, stored_tensors
from .families.roles import Role, Storage
from .tokenizer_data import write_tokenizer
from v4convert.errors import UserError
from . import outputs

WEIGHT_STD = 0.02          # std of dequantized linear weights
FP8_SPREAD = 64.0          # FP8 payload std before scaling (well inside E4M3's +-448)
CHUNK_ELEMS = 1 << 24      # rows per generated chunk are sized to ~16M elements


class SynthError(UserError):
    pass


def _ref_config(name: str) -> dict:
    return json.loads(resources.files("v4convert").joinpath("data/ref/" + name).read_text())


def _v3_tiny(v32: bool) -> dict:
    cfg = copy.deepcopy(_ref_config("deepseek-v3-671b.config.json"))
    cfg.update(hidden_size=160, intermediate_size=224, moe_intermediate_size=96, num_hidden_layers=3,
               first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96,
               kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=24, n_routed_experts=8,
               n_group=4, topk_group=2, num_experts_per_tok=3, vocab_size=611, max_position_embeddings=4096)
    cfg["rope_scaling"] = dict(cfg["rope_scaling"], factor=4, original_max_position_embeddings=1024)
    if v32:
        cfg.update(architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32", index_n_heads=16,
                   index_head_dim=32, index_topk=8)
        cfg["quantization_config"]["scale_fmt"] = "ue8m0"
    return cfg


def _v32_671b() -> dict:
    """DeepSeek-V3.2(-Exp) at full size: V3's published config plus the lightning indexer and UE8M0 block scales
    as in its release config.json (index_n_heads 64, index_head_dim 128, index_topk 2048, scale_fmt ue8m0)."""
    cfg = copy.deepcopy(_ref_config("deepseek-v3-671b.config.json"))
    cfg.update(architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32", index_n_heads=64,
               index_head_dim=128, index_topk=2048)
    cfg["quantization_config"]["scale_fmt"] = "ue8m0"
    return cfg


def _v3_vllm_tiny() -> dict:
    """A tiny V3 within vLLM's constraints: every linear dim a multiple of the 128 FP8 block (q_lora_rank 128),
    MLA latent 512 + rope 64 (vLLM-CPU's MLA decode kernel supports only head size 576), YaRN rope (the
    published kind; vLLM-CPU's rotary kernel for ``rope_type: default`` is wrong on 3-D q)."""
    cfg = copy.deepcopy(_ref_config("deepseek-v3-671b.config.json"))
    cfg.update(hidden_size=256, intermediate_size=384, moe_intermediate_size=128, num_hidden_layers=3,
               first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=128,
               kv_lora_rank=512, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=8,
               n_group=4, topk_group=2, num_experts_per_tok=3, vocab_size=640, max_position_embeddings=4096)
    cfg["rope_scaling"] = dict(cfg["rope_scaling"], factor=4, original_max_position_embeddings=1024)
    return cfg


def _v4_tiny(base: bool) -> dict:
    cfg = copy.deepcopy(_ref_config("deepseek-v4-flash.config.json"))
    cfg.update(hidden_size=160, moe_intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               head_dim=64, qk_rope_head_dim=16, q_lora_rank=96, o_groups=2, o_lora_rank=48,
               n_routed_experts=8, num_experts_per_tok=2, hc_mult=4, index_n_heads=2, index_head_dim=64,
               index_topk=4, sliding_window=8, num_hash_layers=1, vocab_size=611, max_position_embeddings=4096,
               compress_ratios=[0, 4, 128, 4, 0])
    # within llama.cpp's deepseek4 constraints (export/gguf/constraints.py): ratios 0/4/128, hc_mult 4, indexer
    # head a multiple of 64, so the tiny preset's GGUF loads in llama.cpp
    cfg["rope_scaling"] = dict(cfg["rope_scaling"], factor=4, original_max_position_embeddings=1024)
    if base:
        cfg.pop("expert_dtype", None)
    return cfg


def _tp_tiny(cfg: dict) -> dict:
    """A tiny preset widened so that every split of ``export --sharded --tp 2`` falls on whole 128-blocks
    (heads 4 x 128 rows, MLP/expert widths 256, V4 output groups of 128): the sharded layout keeps FP8/FP4
    packed and refuses splits that cut a block, which the plain tiny shapes do."""
    if cfg["model_type"] == "deepseek_v4":
        cfg.update(head_dim=64, o_lora_rank=128, moe_intermediate_size=256)
    else:
        cfg.update(qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64, intermediate_size=256,
                   moe_intermediate_size=256)
        if cfg["model_type"] == "deepseek_v32":
            cfg.update(index_head_dim=128)      # > the (widened) rope dim, as published (64 of 128)
    cfg.update(vocab_size=612)      # divisible by 2 and 4 (DeepSeek's ParallelEmbedding for --deepseek-mp)
    return cfg


# name -> (config factory, default shard size in bytes)
PRESETS: dict[str, tuple[Callable[[], dict], int]] = {
    "v3-tiny": (lambda: _v3_tiny(False), 2 << 20),
    "v32-tiny": (lambda: _v3_tiny(True), 2 << 20),
    "v3-vllm-tiny": (_v3_vllm_tiny, 4 << 20),
    "v4-flash-tiny": (lambda: _v4_tiny(False), 2 << 20),
    "v4-flash-base-tiny": (lambda: _v4_tiny(True), 2 << 20),
    "v3-tp-tiny": (lambda: _tp_tiny(_v3_tiny(False)), 2 << 20),
    "v32-tp-tiny": (lambda: _tp_tiny(_v3_tiny(True)), 2 << 20),
    "v4-flash-tp-tiny": (lambda: _tp_tiny(_v4_tiny(False)), 2 << 20),
    "v3-671b": (lambda: _ref_config("deepseek-v3-671b.config.json"), 5 << 30),
    "v32-671b": (_v32_671b, 5 << 30),
    "v4-flash": (lambda: _ref_config("deepseek-v4-flash.config.json"), 5 << 30),
    "v4-pro": (lambda: _ref_config("deepseek-v4-pro.config.json"), 5 << 30),
}
FULL_SIZE = ("v3-671b", "v32-671b", "v4-flash", "v4-pro")


def parse_layers(spec: str | None, a: Arch) -> set[int] | None:
    """``"3"``, ``"0-1,mtp"``, ``"all"`` -> block indices (MTP blocks are n_layers + i); None = all."""
    if spec is None or spec == "all":
        return None
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if part == "mtp":
            out.update(range(a.n_layers, a.n_blocks))
        elif "-" in part:
            lo, hi = part.split("-", 1)
            out.update(range(int(lo), int(hi) + 1))
        elif part.isdigit():
            out.add(int(part))
        else:
            raise SynthError(f"--layers: cannot parse {part!r} (use e.g. 3, 0-2, mtp)")
    bad = sorted(L for L in out if L >= a.n_blocks)
    if bad:
        raise SynthError(f"--layers: block {bad[0]} out of range (model has {a.n_layers} layers + {a.n_mtp} MTP)")
    return out


# ---------------------------------------------------------------------------------------------
# Value generators (each returns row chunks; deterministic per seed and tensor name)
# ---------------------------------------------------------------------------------------------
def _gen(seed: int, name: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF)
    return g


def _row_chunks(shape: tuple[int, ...], align: int = 1) -> Iterator[tuple[int, int]]:
    rows = shape[0] if shape else 1
    per = max(align, (CHUNK_ELEMS // max(1, math.prod(shape[1:])) // align) * align)
    for r in range(0, rows, per):
        yield r, min(rows, r + per)


def _plain(slot: Slot, dtype: torch.dtype, seed: int) -> Iterator[torch.Tensor]:
    g = _gen(seed, slot.name)
    role = slot.role
    for r0, r1 in _row_chunks(slot.shape):
        shape = (r1 - r0, *slot.shape[1:]) if slot.shape else ()
        if role in _NORM_LIKE:
            yield (1.0 + 0.05 * torch.randn(shape, generator=g)).to(dtype)
        elif role in (Role.ROUTER_BIAS, Role.INDEXER_K_NORM_BIAS, Role.HC_BASE, Role.ATTN_SINK):
            yield (0.01 * torch.randn(shape, generator=g)).to(dtype)
        elif role is Role.HC_SCALE:
            yield (0.5 + 0.1 * torch.rand(shape, generator=g)).to(dtype)
        else:
            yield (WEIGHT_STD * torch.randn(shape, generator=g)).to(dtype)


_NORM_LIKE = frozenset({Role.FINAL_NORM, Role.ATTN_NORM, Role.FFN_NORM, Role.ATTN_Q_A_NORM, Role.ATTN_KV_A_NORM,
                        Role.COMPRESSOR_NORM, Role.INDEXER_COMPRESSOR_NORM, Role.INDEXER_K_NORM, Role.MTP_ENORM,
                        Role.MTP_HNORM, Role.MTP_HEAD_NORM})


def _hash_table(a: Arch, slot: Slot, seed: int) -> torch.Tensor:
    """tid2eid ``[vocab, top_k]`` int64: each token id routed to top_k distinct experts."""
    g = _gen(seed, slot.name)
    return torch.argsort(torch.rand((a.vocab, a.n_experts), generator=g), dim=-1)[:, : a.top_k].contiguous()


def _fp8_block(slot: Slot, scale_dtype: str, seed: int) -> tuple[Iterable[torch.Tensor], Callable[[], torch.Tensor]]:
    """FP8 E4M3 payload ~N(0, 64) clipped to +-448 and a per-block scale so that values have std ~0.02.

    E8M0 scales are powers of two near 0.02/64; F32 scales vary by +-25 % per block.
    """
    n, k = slot.shape
    gs = _gen(seed, slot.name + "#scale")
    bn, bk = -(-n // FP8_BLOCK), -(-k // FP8_BLOCK)
    base = WEIGHT_STD / FP8_SPREAD
    if scale_dtype == "F8_E8M0":
        e = round(math.log2(base)) + 127 + torch.randint(-1, 2, (bn, bk), generator=gs)
        scale = e.to(torch.uint8)
    else:
        scale = (base * (0.75 + 0.5 * torch.rand((bn, bk), generator=gs))).to(torch.float32)

    def payload() -> Iterator[torch.Tensor]:
        g = _gen(seed, slot.name)
        for r0, r1 in _row_chunks(slot.shape, FP8_BLOCK):
            x = torch.randn((r1 - r0, k), generator=g).mul_(FP8_SPREAD).clamp_(-448.0, 448.0)
            yield x.to(torch.float8_e4m3fn)
    return payload(), lambda: scale


def _mxfp4(slot: Slot, seed: int) -> tuple[Iterable[torch.Tensor], Callable[[], torch.Tensor]]:
    """Packed E2M1 pairs over all 16 codes and E8M0 scales 2^-7..2^-5 (values up to ~0.19)."""
    n, k = slot.shape
    gs = _gen(seed, slot.name + "#scale")
    scale = (127 - 6 + torch.randint(-1, 2, (n, k // MXFP4_BLOCK), generator=gs)).to(torch.uint8)

    def payload() -> Iterator[torch.Tensor]:
        g = _gen(seed, slot.name)
        for r0, r1 in _row_chunks((n, k // 2)):
            yield torch.randint(0, 256, (r1 - r0, k // 2), generator=g, dtype=torch.int32).to(torch.uint8).view(torch.int8)
    return payload(), lambda: scale


# ---------------------------------------------------------------------------------------------
@dataclass
class SynthResult:
    out: Path
    n_tensors: int
    n_bytes: int
    n_shards: int


def planned_tensors(a: Arch, layers: set[int] | None, with_globals: bool, seed: int) -> list[PlannedTensor]:
    """Every stored tensor of the selection, in published order (each weight followed by its scale)."""
    planned: list[PlannedTensor] = []
    for slot in inventory(a, layers, with_globals):
        entries = stored_tensors(a, slot)
        if slot.storage is Storage.FP8_BLOCK:
            (wn, wd, ws), (sn, sd, ss) = entries
            payload, scale = _fp8_block(slot, sd, seed)
            planned += [PlannedTensor(wn, wd, ws, lambda p=payload: p),
                        PlannedTensor(sn, sd, ss, scale)]
        elif slot.storage is Storage.MXFP4:
            payload, scale = _mxfp4(slot, seed)
            (wn, wd, ws), (sn, sd, ss) = entries
            planned += [PlannedTensor(wn, wd, ws, lambda p=payload: p), PlannedTensor(sn, sd, ss, scale)]
        else:
            (wn, wd, ws), = entries
            dt = {"BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64}[wd]
            if slot.role is Role.HASH_TABLE:
                planned.append(PlannedTensor(wn, wd, ws, lambda s=slot: _hash_table(a, s, seed)))
            else:
                planned.append(PlannedTensor(wn, wd, ws, lambda s=slot, d=dt: _plain(s, d, seed)))
    return planned


def assign_shards(planned: list[PlannedTensor], shard_size: int) -> list[list[PlannedTensor]]:
    """In-order split into shards of at most ``shard_size`` bytes (a tensor never splits)."""
    return group_in_order(planned, [t.nbytes for t in planned], shard_size)


def preset_config(preset: str) -> dict:
    try:
        return PRESETS[preset][0]()
    except KeyError:
        raise SynthError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}") from None


def synth(preset: str, out: Path, seed: int = 0, layers: str | None = None, shard_size: int | None = None,
          with_embed: bool | None = None, progress: bool = False, overwrite: bool = False) -> SynthResult:
    """Write a checkpoint of ``preset`` into ``out`` (created; must not exist or be empty).

    Full-size presets need ``layers`` (writing 688 GB by accident helps no one); ``with_embed``
    adds embed/head/final norm (default: on for tiny presets and whole models, off for layer subsets).
    Writes into ``out.partial`` and renames at the end.
    """
    cfg = preset_config(preset)
    a = Arch.from_config(cfg, f"preset {preset}")
    if preset in FULL_SIZE and layers is None:
        raise SynthError(f"preset {preset} is full size: pass --layers (e.g. --layers 3 or --layers 0-1,mtp)")
    sel = parse_layers(layers, a)
    if with_embed is None:
        with_embed = sel is None
    shard_size = shard_size or PRESETS[preset][1]
    out = Path(out)
    outputs.recover(out)
    try:
        outputs.claim(out, overwrite=overwrite)
    except outputs.OutputError as e:
        raise SynthError(str(e)) from None
    tmp = outputs.partial_path(out)
    outputs.remove_ours(tmp)                 # a killed earlier run's scratch (claim checked it is ours)
    tmp.mkdir(parents=True)
    outputs.write_marker(tmp, "synth", "writing")
    planned = planned_tensors(a, sel, with_embed, seed)
    shards = assign_shards(planned, shard_size)
    total = sum(t.nbytes for t in planned)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"synth {preset}")
    weight_map: dict[str, str] = {}
    n = len(shards)
    # The V3/R1/V3.1/V3.2 releases name shards "model-00001-of-000163.safetensors" (6-digit total).
    of_digits = 6 if a.family.is_v3_like else 5
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{n:0{of_digits}d}.safetensors"
        write_streaming(tmp / fname, shard, {"format": "pt"}, bar.update if bar else None)
        weight_map.update({t.name: fname for t in shard})
    if bar:
        bar.close()
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(tmp)
    outputs.write_marker(tmp, "synth", "complete", preset=preset, seed=seed)
    outputs.swap_in(tmp, out)
    return SynthResult(out, len(planned), total, n)

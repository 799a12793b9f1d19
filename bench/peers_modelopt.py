"""NVIDIA ModelOpt side of bench/peers.py, run in the peers venv (bench/peers_venv.sh).

    PEERS_PY bench/peers_modelopt.py BF16_DIR CALIB.pt OUT_DIR PRESET[:ALGORITHM][:weights-only]

Loads the BF16 transformers copy, runs ``modelopt.torch.quantization.quantize`` (its documented PTQ API) with the
named preset config (e.g. ``W4A16_NVFP4_CFG``; ``:awq_lite`` replaces its ``algorithm``, ``:weights-only``
appends the documented ``{"quantizer_name": "*input_quantizer", "enable": False}`` entry so a W4A4 preset keeps
16-bit activations like every other row), the calibration forward loop over the windows in CALIB.pt (int64 [W, L], our bundled
training split, batches of 8), and writes the unified HF checkpoint with
``modelopt.torch.export.export_hf_checkpoint`` (ModelOpt NVFP4: packed uint8 weight, E4M3 ``weight_scale``,
F32 ``weight_scale_2``).
"""
from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

import torch


def main() -> None:
    src, calib, out, cfg_name = sys.argv[1:5]
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.bfloat16)
    ids = torch.load(calib)

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for i in range(0, len(ids), 8):
                m(input_ids=ids[i:i + 8])

    name, *mods = cfg_name.split(":")
    cfg = copy.deepcopy(getattr(mtq, name))
    for m in mods:
        if m == "weights-only":
            cfg["quant_cfg"].append({"quantizer_name": "*input_quantizer", "enable": False})
        else:
            cfg["algorithm"] = m
    mtq.quantize(model, cfg, forward_loop)
    export_hf_checkpoint(model, export_dir=out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (Path(src) / f).exists():
            shutil.copy(Path(src) / f, Path(out) / f)


if __name__ == "__main__":
    main()

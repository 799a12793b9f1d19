"""AutoRound side of bench/peers.py, run in the peers venv (bench/peers_venv.sh).

    PEERS_PY bench/peers_autoround.py BF16_DIR CALIB.pt OUT_DIR {NVFP4|MXFP4} ITERS [LR]

Loads the BF16 transformers copy and runs ``auto_round.AutoRound`` (its documented Python API) with the weight
half of its preset scheme (NVFP4: FP4 E2M1, 16-element groups, E4M3 scales + global scale; MXFP4: 32-element
groups, E8M0 scales) and activations left at 16 bits, like every other row (the presets also quantize
activations, which our verify does not model); ITERS SignRound steps per block at learning rate LR (its
recipes: default 200 / auto, light 50 / 5e-3; 0 = its RTN, with its 'optimized RTN' on the non-MoE layers), calibrating on
the windows in CALIB.pt (int64 [W, L], our bundled training split); saves ``format="llm_compressor"``
(compressed-tensors) into OUT_DIR (AutoRound writes into a sub-folder named after the scheme; moved up).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch


def main() -> None:
    src, calib, out, scheme, iters = sys.argv[1:6]
    lr = {"lr": float(sys.argv[6])} if len(sys.argv) > 6 else {}
    from auto_round import AutoRound
    from auto_round.schemes import PRESET_SCHEMES, QuantizationScheme
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(src)
    ids = torch.load(calib)
    # passing only act_bits=16 is reset to 4 by AutoRound ("'act_data_type' does not match 'act_bits'")
    weight_half = {k: v for k, v in vars(PRESET_SCHEMES[scheme]).items() if not k.startswith("act_") and v is not None}
    ar = AutoRound(model, tokenizer=tok, scheme=QuantizationScheme.from_dict({**weight_half, "act_bits": 16}),
                   dataset=[x[None] for x in ids], iters=int(iters), nsamples=len(ids), seqlen=ids.shape[1],
                   batch_size=8, device_map="cpu", **lr)
    ar.quantize_and_save(out, format="llm_compressor")
    subs = [p for p in Path(out).iterdir() if p.is_dir()]
    if len(subs) == 1 and not (Path(out) / "config.json").exists():
        for f in subs[0].iterdir():
            shutil.move(str(f), str(Path(out) / f.name))
        subs[0].rmdir()


if __name__ == "__main__":
    main()

"""llm-compressor side of bench/peers.py, run in its own venv (see bench/peers.py for the setup command).

    PEERS_PY bench/peers_llmc.py BF16_DIR CALIB.pt OUT_DIR {rtn|gptq} [SCHEME [EXTRA_IGNORE,...]]

Loads the BF16 transformers copy, runs ``llmcompressor.oneshot`` with one of its preset schemes (SCHEME, default
NVFP4A16; NVFP4 / MXFP4 are its W4A4 presets: NVFP4 with static per-tensor input global scales from the
calibration, MXFP4 dynamic per-32 activations) and ``QuantizationModifier`` (its RTN) or ``GPTQModifier``, on
Linear layers except lm_head and the MoE router,
calibrating on the windows in CALIB.pt (int64 [W, L], our bundled training split), and saves compressed-tensors.
"""
from __future__ import annotations

import sys

import torch


def main() -> None:
    src, calib, out, method = sys.argv[1:5]
    scheme = sys.argv[5] if len(sys.argv) > 5 else "NVFP4A16"
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.bfloat16)
    ids = torch.load(calib)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    ignore = ["lm_head", "re:.*mlp.gate$", *(sys.argv[6].split(",") if len(sys.argv) > 6 else [])]
    mod = (QuantizationModifier if method == "rtn" else GPTQModifier)(targets="Linear", scheme=scheme,
                                                                      ignore=ignore)
    oneshot(model=model, dataset=ds, recipe=mod, max_seq_length=ids.shape[1], num_calibration_samples=len(ids))
    model.save_pretrained(out, save_compressed=True)


if __name__ == "__main__":
    main()

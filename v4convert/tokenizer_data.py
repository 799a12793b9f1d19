"""A small deterministic byte-level BPE tokenizer for synthetic checkpoints.

DeepSeek ships a byte-level BPE (``tokenizer.json``, ``LlamaTokenizerFast`` class in
``tokenizer_config.json``, bos id 0 ``<｜begin▁of▁sentence｜>``, eos id 1 ``<｜end▁of▁sentence｜>``). We train one of the
same kind with ``tokenizers`` on a fixed embedded text, so every synthetic checkpoint has a real,
loadable tokenizer without any download.

BOS: DeepSeek's release ``tokenizer.json`` adds it itself (post-processor: ByteLevel, then a template
``BOS $A``), so every consumer that encodes with special tokens (transformers, vLLM, ``tokenizers``) gets
the same ids. :func:`add_bos_post_processor` gives our tokenizers the same post-processor; our own runtime
encodes with ``add_special_tokens=False`` and prepends BOS from the configs (never twice).
"""
from __future__ import annotations

import json
from pathlib import Path

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
TOKENIZER_VOCAB = 512

_CORPUS = """\
Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.
Complex is better than complicated. Flat is better than nested. Sparse is better than dense.
Readability counts. Special cases aren't special enough to break the rules.
Although practicality beats purity. Errors should never pass silently. Unless explicitly silenced.
In the face of ambiguity, refuse the temptation to guess.
There should be one-- and preferably only one --obvious way to do it.
Now is better than never. Although never is often better than *right* now.
If the implementation is hard to explain, it's a bad idea.
If the implementation is easy to explain, it may be a good idea.
Namespaces are one honking great idea -- let's do more of those!
def quantize(weight, scale):
    return torch.round(weight / scale).clamp(-448, 448)
for layer in range(61):
    print(f"layer {layer}: experts {256}, top-k {8}")
The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few experts.
Hello, world! The model reads the prompt, fills its cache, and generates one token at a time.
"""


def add_bos_post_processor(tok) -> None:
    """Set DeepSeek's release post-processor on ``tok`` (a ``tokenizers.Tokenizer`` holding BOS)."""
    from tokenizers import processors

    bos_id = tok.token_to_id(BOS)
    if bos_id is None:
        raise ValueError(f"tokenizer has no {BOS} token")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                                      special_tokens=[(BOS, bos_id)])])


def build_tokenizer():
    """The tokenizer object (``tokenizers.Tokenizer``), identical on every run."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    add_bos_post_processor(tok)
    return tok


def write_tokenizer(out: Path) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json`` into ``out``."""
    tok = build_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS,
        "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 16384,
        "pad_token": EOS, "tokenizer_class": "LlamaTokenizerFast", "unk_token": None,
        "chat_template": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
                         "{% else %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}",
    }, indent=2, ensure_ascii=False))
    (out / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "do_sample": True,
         "temperature": 0.6, "top_p": 0.95}, indent=2))

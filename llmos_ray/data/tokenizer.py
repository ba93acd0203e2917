"""Tokenizers: train a byte-level BPE on corpus text, or load an existing one.

A trained tokenizer is saved as a directory that `transformers.AutoTokenizer` loads, with
bos/eos/pad and the chat special tokens, and a chat template that uses them.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Optional

from llmos_ray.errors import DataError

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SPECIAL_TOKENS = [EOS, PAD, *CHAT_TOKENS]

# Rendered identically by the trainer (finetune) and by serving. `{% generation %}` marks what an
# assistant writes, so `return_assistant_tokens_mask=True` yields exactly the tokens that carry loss.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Optional[str] = None):
    """Train a byte-level BPE tokenizer on `texts`; return it as a `PreTrainedTokenizerFast`
    (saved to `out_dir` when given). The same texts in the same order give the same tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(f"data.vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
                        f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    seen = [0]

    def counted():
        for t in texts:
            seen[0] += 1
            yield t

    tok.train_from_iterator(counted(), trainer=trainer)
    if seen[0] == 0:
        raise DataError("cannot train a tokenizer: the corpus sample has no documents")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                 unk_token=None, additional_special_tokens=CHAT_TOKENS,
                                 model_max_length=1 << 30, clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    if out_dir:
        save_tokenizer(hf, out_dir)
    return hf


def save_tokenizer(tokenizer, out_dir: str) -> None:
    """Save atomically: a directory is either complete or absent."""
    import shutil

    tmp = f"{out_dir.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def load_tokenizer(name_or_path: str):
    """Load a tokenizer directory (ours or any Hugging Face one) or hub name; make sure it can pad."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(os.path.expanduser(name_or_path))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load tokenizer {name_or_path!r}: {str(e).splitlines()[0]}") from None
    if tok.eos_token is None:
        raise DataError(f"tokenizer {name_or_path!r} has no eos token; documents are joined with it when packing")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok

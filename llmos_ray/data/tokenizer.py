"""Tokenizers: train a byte-level BPE on corpus text, or load an existing one.

A trained tokenizer is saved as a directory that `transformers.AutoTokenizer` loads, with
bos/eos/pad and the chat special tokens, and a chat template that uses them. `get_tokenizer(cfg)`
picks a run's tokenizer: data.tokenizer, else the one already trained for the run, else a new one
trained on the run's training documents.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Iterable, Iterator, Optional

from llmos_ray.errors import DataError
from llmos_ray.storage import cache_dir, is_remote, local_path, localize, upload_dir

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SPECIAL_TOKENS = [EOS, PAD, *CHAT_TOKENS]

# Rendered identically by the trainer (finetune) and by serving. `{% generation %}` marks what an
# assistant writes, so `return_assistant_tokens_mask=True` yields exactly the tokens that carry loss.
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|system|>\nYou can call these tools. To call one, reply with <tool_call>{\"name\": NAME, "
    "\"arguments\": {...}}</tool_call>.\n' }}{{ tools | map(attribute='function') | list | tojson }}"
    "{{ '<|end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] or [] %}{{ '<tool_call>' }}"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}"
    "{{ '</tool_call>' }}{% endfor %}{{ '<|end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
"""Our chat template: <|role|> turns ended by <|end|>; tools (OpenAI's function specs) in a first
system turn, and an assistant's tool calls as <tool_call>{"name", "arguments"}</tool_call>
(serve.tools parses them back)."""


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


def save_tokenizer(tokenizer, out_dir: str, metadata: Optional[dict] = None) -> None:
    """Save atomically: a directory is either complete or absent. `metadata` (how it was
    trained) goes to TRAINING_FILE beside it."""
    import shutil

    tmp = f"{out_dir.rstrip('/')}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    if metadata is not None:
        with open(os.path.join(tmp, TRAINING_FILE), "w") as f:
            json.dump(metadata, f, indent=2)
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


TRAINING_FILE = "llmos_tokenizer.json"


def tokenizer_dir(cfg) -> str:
    """Where a run's trained tokenizer lives: <run.output_dir>/tokenizer (any fsspec URI)."""
    return f"{cfg.run.output_dir.rstrip('/')}/tokenizer"


def run_tokenizer(cfg, texts, trained_on: str):
    """model.base's tokenizer, data.tokenizer, the run's own (a resumed run), or a byte-level BPE of
    data.vocab_size trained on `texts()` (called only then) and saved as the run's, said as `trained_on`."""
    out = local_path(tokenizer_dir(cfg))
    if cfg.model.base or cfg.data.tokenizer:
        return load_tokenizer(cfg.model.base or cfg.data.tokenizer)
    if os.path.isfile(os.path.join(out, "tokenizer_config.json")):
        tokenizer = load_tokenizer(out)
        log.info("tokenizer: reusing %s (%d tokens)", out, len(tokenizer))
        return tokenizer
    texts = texts()
    save_tokenizer(train_tokenizer(texts, cfg.data.vocab_size), out,
                   {"vocab_size": cfg.data.vocab_size, "trained_on": trained_on, "texts": len(texts)})
    tokenizer = load_tokenizer(out)
    log.info("tokenizer: trained %d tokens on %d training texts -> %s", len(tokenizer), len(texts), out)
    return tokenizer


def get_tokenizer(cfg):
    """The tokenizer of a run (a transformers fast tokenizer).

    data.tokenizer when set; else the tokenizer already trained for this run in
    `tokenizer_dir(cfg)` (a resumed run reuses it); else a byte-level BPE of data.vocab_size
    trained on the first data.tokenizer_sample_bytes of the training documents in corpus order
    (cleaned and split exactly as the pipeline does; whole documents, the last one may cross
    the limit), saved there."""
    data = cfg.data
    if data.tokenizer:
        return load_tokenizer(data.tokenizer)
    out = tokenizer_dir(cfg)
    if _is_saved(out):
        local = localize(out, "tokenizers", refresh=True)
        tok = load_tokenizer(local)
        _warn_if_changed(local, data, out)
        log.info("tokenizer: reusing %s (%d tokens)", out, len(tok))
        return tok
    from llmos_ray.data.documents import iter_documents

    start = time.time()
    sample = _Sample(iter_documents(data, "train"), data.tokenizer_sample_bytes)
    tok = train_tokenizer(sample, data.vocab_size)
    metadata = {"vocab_size": data.vocab_size, "tokenizer_sample_bytes": data.tokenizer_sample_bytes,
                "sample_documents": sample.documents, "sample_bytes": sample.bytes,
                "seconds": round(time.time() - start, 2)}
    local = cache_dir("tokenizers", out) if is_remote(out) else local_path(out)
    save_tokenizer(tok, local, metadata)
    if is_remote(out):
        upload_dir(local, out)
    log.info("tokenizer: trained %d tokens on %d documents (%.1f MB) in %.1f s -> %s", len(tok), sample.documents,
             sample.bytes / 1e6, time.time() - start, out)
    return load_tokenizer(local)


class _Sample:
    """Documents from `texts` until `limit` UTF-8 bytes have been yielded (whole documents)."""

    def __init__(self, texts: Iterable[str], limit: int):
        self.texts, self.limit = texts, limit
        self.documents = self.bytes = 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            if self.bytes >= self.limit:
                return
            self.documents += 1
            self.bytes += len(text.encode("utf-8"))
            yield text


def _is_saved(out: str) -> bool:
    if not is_remote(out):
        return os.path.isfile(os.path.join(local_path(out), "tokenizer_config.json"))
    import fsspec

    fs, path = fsspec.core.url_to_fs(out)
    return fs.exists(f"{path}/tokenizer_config.json")


def _warn_if_changed(local: str, data, where: str) -> None:
    try:
        with open(os.path.join(local, TRAINING_FILE)) as f:
            trained = json.load(f)
    except (OSError, ValueError):
        return
    if trained.get("vocab_size") != data.vocab_size:
        log.warning("tokenizer %s was trained with data.vocab_size=%s, the config now says %s; delete the "
                    "directory to train a new one", where, trained.get("vocab_size"), data.vocab_size)

"""Fine-tuning an encoder-decoder (finetune.task=seq2seq): source → target records → token arrays →
the same trainer, loop, checkpoints and export as every other run (`run_training`), with the
Seq2SeqLM task (tasks.py).

    result = finetune(load_config(None, ["finetune.task=seq2seq"]))   # embedded en -> fr pairs
    model = AutoModelForSeq2SeqLM.from_pretrained(result.export_dir)   # a T5ForConditionalGeneration

The model: `model.base` (our t5 exports, a hub T5) or — no base — a fresh preset of model.family
(t5 by default for this task) trained from scratch, with a byte-level BPE tokenizer trained on the
training pairs (data.vocab_size; saved in the run's directory, so a resumed run reuses it) and
framed to end every text with EOS (data/seq2seq.frame_for_seq2seq).
"""

from __future__ import annotations

import logging

from llmos_ray.config import Config
from llmos_ray.errors import DataError
from llmos_ray.train.examples import train_on_examples
from llmos_ray.train.trainer import TrainResult, progress_log

log = logging.getLogger(__name__)


def finetune_seq2seq(cfg: Config) -> TrainResult:
    """Train an encoder-decoder on `finetune.paths` (or the embedded translation pairs); `cfg` is resolved."""
    return train_on_examples(cfg, seq2seq_data)


def source_target_bounds(cfg: Config) -> tuple[int, int]:
    """(source, target) token bounds of a run: finetune.max_source_len / max_target_len, else data.seq_len."""
    ft = cfg.finetune
    return ft.max_source_len or cfg.data.seq_len, ft.max_target_len or cfg.data.seq_len


def seq2seq_data(cfg: Config):
    """(tokenizer, train Pairs, held-out Pairs or None, task info for the workers, source)."""
    from llmos_ray.data.seq2seq import encode_pairs, pair_records

    ft = cfg.finetune
    splits = pair_records(cfg)
    tokenizer = seq2seq_tokenizer(cfg, splits.train)
    max_src, max_tgt = source_target_bounds(cfg)
    args = dict(prefix=ft.task_prefix or "", source_lang=ft.source_lang, target_lang=ft.target_lang)
    train = encode_pairs(splits.train, tokenizer, max_src, max_tgt, max_bad_fraction=cfg.data.max_bad_fraction,
                         **args)
    val = encode_pairs(splits.val, tokenizer, max_src, max_tgt, **args) if splits.val else None
    c = train.counts
    progress_log.info("seq2seq data: %d training pairs (%d bad records; %d sources truncated to %d tokens, %d "
                      "targets to %d)%s", c["examples"], c["bad_records"], c["truncated_source"], max_src,
                      c["truncated_target"], max_tgt, f"; held out: {val.counts['examples']}" if val else "")
    per_step = cfg.train.micro_batch_size * cfg.train.num_workers
    if c["examples"] < per_step:
        raise DataError(f"{c['examples']} seq2seq pairs are fewer than one step needs "
                        f"(train.micro_batch_size * train.num_workers = {per_step})")
    info = {"decoder_start_token_id": decoder_start_id(cfg, tokenizer), "pad_token_id": tokenizer.pad_token_id}
    return tokenizer, train, val, info, splits.source


def decoder_start_id(cfg: Config, tokenizer) -> int:
    """The token the decoder starts from: model.base's decoder_start_token_id, else the preset's (pad)."""
    if cfg.model.base:
        from transformers import AutoConfig

        start = AutoConfig.from_pretrained(cfg.model.base, trust_remote_code=cfg.model.trust_remote_code
                                           ).decoder_start_token_id
        if start is not None:
            return int(start)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.bos_token_id


def seq2seq_tokenizer(cfg: Config, train_records: list):
    """model.base's tokenizer, data.tokenizer, the run's own (a resumed run), or a byte-level BPE
    trained on the training pairs' sources and targets and saved as the run's; framed for seq2seq."""
    from llmos_ray.data.seq2seq import frame_for_seq2seq, pair_texts
    from llmos_ray.data.tokenizer import run_tokenizer

    ft = cfg.finetune

    def texts() -> list[str]:
        return pair_texts(train_records, ft.source_lang, ft.target_lang) + ([ft.task_prefix] if ft.task_prefix else [])

    tokenizer = run_tokenizer(cfg, texts, "seq2seq pairs")
    frame_for_seq2seq(tokenizer)
    return tokenizer

"""Corpus pipeline: read → clean → tokenize → pack into blocks → streaming shards per worker.

    from llmos_ray.data import get_tokenizer, packed_dataset, iter_blocks, ingest_options

    tok = get_tokenizer(cfg)                        # data.tokenizer, the run's, or a new BPE
    train = packed_dataset(cfg, tok, "train")       # Ray Dataset of {"input_ids": int32[seq_len+1]}
    # in a Ray Train worker (trainer built with DataConfig(execution_options=ingest_options())):
    shard = ray.train.get_dataset_shard("train")
    blocks = iter_blocks(shard.iter_batches(batch_format="numpy"), cfg.data.seq_len + 1)
    for block in blocks: ...                       # blocks.leftover at the end

`prepare(cfg)` runs it once and writes tokenizer, parquet splits and stats.json
(`llmos data prepare`). See pipeline.py for the stages and documents.py for the accounting.
"""

from llmos_ray.data.corpus import resolve_corpus
from llmos_ray.data.documents import iter_documents
from llmos_ray.data.pack import BlockStream, iter_blocks, pack_blocks, pack_documents
from llmos_ray.data.pipeline import documents_dataset, has_validation, ingest_options, packed_dataset
from llmos_ray.data.prepare import prepare
from llmos_ray.data.sources import list_sources
from llmos_ray.data.stats import corpus_stats
from llmos_ray.data.tokenizer import get_tokenizer, load_tokenizer, tokenizer_dir, train_tokenizer

__all__ = [
    "list_sources", "resolve_corpus", "iter_documents", "documents_dataset", "packed_dataset", "iter_blocks",
    "BlockStream", "pack_documents", "pack_blocks", "get_tokenizer", "load_tokenizer", "train_tokenizer",
    "tokenizer_dir", "prepare", "corpus_stats", "ingest_options", "has_validation"
]

"""The data pipeline: sources -> token stream (cached) -> packed windows -> hashed batches per rank and step."""
from compute.data.config import DataConfig
from compute.data.hashed_batches import BatchHasher, HashedBatch, LayerRows, split_by_shard
from compute.data.loader import HashedBatchLoader, StepDataset, hashed_batches
from compute.data.packing import PackedSequences, StepSchedule
from compute.data.sources import SourceFile, read_documents, resolve_sources, stdlib_files
from compute.data.token_stream import TokenStream, load_token_stream

__all__ = [
    "BatchHasher", "DataConfig", "HashedBatch", "HashedBatchLoader", "LayerRows", "PackedSequences",
    "SourceFile", "StepDataset", "StepSchedule", "TokenStream", "hashed_batches", "load_token_stream",
    "read_documents", "resolve_sources", "split_by_shard", "stdlib_files",
]

"""Layered training data (DESIGN.md 2.6): one import for the pieces, which live in their own modules.

    layered_sample      LayeredSample (in memory, [0, 1] tensors), composite, check_sample
    sample_files        the on-disk sample folder format: encode/write, decode/read, validate one folder
    dataset_shards      WebDataset tar shards: write_shards, iter_shard_records/samples, find_shards
    dataset_validation  DatasetReport, validate_dataset (folders or shards), validate_shards
    dataset_loading     torch datasets: LayeredFolderDataset, LayeredShardDataset, sample_to_item, resize_center_crop
    dataset_batching    bucketing by foreground count, BucketBatchSampler, collate_layered

The sample format is documented at the top of :mod:`.sample_files` and :mod:`.dataset_shards`.
"""
from __future__ import annotations

from .dataset_batching import BucketBatchSampler, bucket_by_foregrounds, bucketed_batches, collate_layered
from .dataset_loading import LayeredFolderDataset, LayeredShardDataset, resize_center_crop, sample_to_item
from .dataset_shards import ShardRecord, find_shards, iter_shard_records, iter_shard_samples, write_shards
from .dataset_validation import DatasetReport, validate_dataset, validate_shards
from .layered_sample import LayeredSample, check_sample, composite
from .sample_files import (BACKGROUND_PNG, COMPOSITE_PNG, MASK_TOLERANCE, SAMPLE_FORMAT, SAMPLE_JSON, decode_files,
                           foreground_name, list_sample_folders, mask_name, read_sample, sample_files, validate_sample,
                           write_sample)

__all__ = [
    "BACKGROUND_PNG", "COMPOSITE_PNG", "MASK_TOLERANCE", "SAMPLE_FORMAT", "SAMPLE_JSON",
    "BucketBatchSampler", "DatasetReport", "LayeredFolderDataset", "LayeredSample", "LayeredShardDataset",
    "ShardRecord", "bucket_by_foregrounds", "bucketed_batches", "check_sample", "collate_layered", "composite",
    "decode_files", "find_shards", "foreground_name", "iter_shard_records", "iter_shard_samples",
    "list_sample_folders", "mask_name", "read_sample", "resize_center_crop", "sample_files", "sample_to_item",
    "validate_dataset", "validate_sample", "validate_shards", "write_sample", "write_shards",
]

"""Layered training data: the sample record and its checks, sample folders, WebDataset shards, dataset
validation, loading (resize, tensors) and batching by foreground count."""

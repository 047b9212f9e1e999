"""Data: tokenizers and Ray Data pipelines that turn text corpora into tokenized Parquet shards."""

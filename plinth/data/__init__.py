"""Data for pretraining: sources, cleaning, tokenized shards."""

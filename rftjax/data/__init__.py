"""Data: procedural tasks, TFDS builders, grain pipelines, tokenizer, importers for user datasets."""

"""Recipes: the jobs that compose the library (``models``, ``data``, ``train``, ``eval``) into
what a user runs, and the only layer that starts Ray work or opens MLflow runs.

- :mod:`.pretrain`: ``aimctl pretrain`` (the only ``TorchTrainer``; probes during a run).
- :mod:`.probe`: ``aimctl probe`` (features of a frozen trunk by Ray Data, probes, LoRA).
- :mod:`.study`: ``aimctl study`` (Ray Tune over pre-training trials).
- :mod:`.tokenizer`: ``aimctl tokenizer-fit`` (k-means codebook from the data pipeline).
- :mod:`.ingest`: ``aimctl ingest`` (images -> Parquet shards, Ray Data) and the built-in
  sources' one-time ingest that the other jobs call first.
"""

"""The data path: ingest to Parquet shards, object storage, decode/crop/patchify, Ray Data.

Modules: :mod:`storage` (filesystems from URLs), :mod:`sources` (folders, tars, built-ins),
:mod:`ingest` (``aimctl ingest``), :mod:`transforms` (plain NumPy/Pillow, no Ray),
:mod:`pipeline` (Ray Data datasets for Ray Train), :mod:`bench` (``aimctl bench data``).
Importing this package does not import Ray.
"""

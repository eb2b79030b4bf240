"""aim-platform: pre-train and study Autoregressive Image Models (AIM) on Ray.

The core (``aim_platform.models``, ``aim_platform.config``) is plain PyTorch and pydantic and
imports without Ray. The library (``models``, ``data``, ``train``, ``eval``) never
orchestrates; the recipes in ``aim_platform.jobs`` compose it and are the only layer that starts
Ray work or opens MLflow runs (through ``aim_platform.tracking``, the one module that imports
MLflow); ``aim_platform.cli`` is ``aimctl``. ``tests/test_architecture.py`` keeps it so.
"""

__version__ = "0.1.0"

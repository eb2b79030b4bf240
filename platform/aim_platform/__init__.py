"""aim-platform: pre-train and study Autoregressive Image Models (AIM) on Ray.

The core (``aim_platform.models``, ``aim_platform.config``) is plain PyTorch and pydantic and
imports without Ray; Ray appears only in the launchers, the data pipeline and the studies.
"""

__version__ = "0.1.0"

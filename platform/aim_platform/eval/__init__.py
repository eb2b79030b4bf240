"""Downstream evaluation: features from a frozen trunk, probes, LoRA, loss-vs-accuracy.

For embeddings rather than a probe::

    from aim_platform.eval import load_trunk, embed
    trunk, cfg = load_trunk("runs/my-run/final")          # or a converted AIM v1 file
    feats = embed(trunk, cfg, images)                      # (N, D) mean-pooled last block
"""

from aim_platform.eval.features import embed, load_trunk

__all__ = ["embed", "load_trunk"]

"""The AIM trunk, the pre-training model (trunk + pixel head + loss) and the classifier.

Control flow lives in ``forward``; the pieces are in :mod:`.layers`, :mod:`.heads`,
:mod:`.patterns` and :mod:`.losses`.

Over 400 lines on purpose: the trunk, the pre-training model and the classifier share the patch
embedding and the block stack; split apart, one forward pass would be read across files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from aim_platform.models.heads import AttentiveProbe, LinearProbe, PixelHead
from aim_platform.models.layers import (
    AttentionKind,
    Block,
    BlockMask,
    PatchEmbed,
    attention_mask,
    flex_block_mask,
    patchify,
    pixels_to_input,
    sincos_pos_embed_2d,
)
from aim_platform.models.losses import (
    LossOutput,
    masked_patch_loss,
    masked_token_loss,
    next_patch_loss,
    next_token_loss,
    normalize_patches,
)
from aim_platform.models.patterns import pattern_order
from aim_platform.models.tokenizer import assign_tokens, load_codebook

if TYPE_CHECKING:  # config imports the size registry from this package
    from aim_platform.config import ModelConfig


def sample_prefix_lengths(
    batch: int, low: int, high: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Prefix lengths S ~ U{low..high} (inclusive), one per sample. (B,) int64 on the CPU."""
    return torch.randint(low, high + 1, (batch,), generator=generator)


def sample_mask(
    batch: int,
    num_patches: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random masks for masked image modelling: ``round(ratio * K)`` patches per sample.

    The count is clamped to [1, K-1] so that every sample has a masked and a visible patch.

    Args:
        batch: B.
        num_patches: K.
        ratio: Share of patches to mask, in (0, 1).
        generator: Seed source; its device is where the draw happens (None: torch's global
            RNG on ``device``).
        device: Where the mask goes.

    Returns:
        (B, K) bool, True where the patch is masked.
    """
    n = min(max(round(ratio * num_patches), 1), num_patches - 1)
    where = generator.device if generator is not None else device
    noise = torch.rand(batch, num_patches, generator=generator, device=where)  # (B, K)
    picked = noise.argsort(dim=1)[:, :n]  # (B, n) masked patch indices
    mask = torch.zeros(batch, num_patches, dtype=torch.bool, device=where)  # (B, K)
    mask.scatter_(1, picked, True)
    return mask.to(device, non_blocking=True) if device is not None else mask


class AIMTrunk(nn.Module):
    """ViT trunk: patch embedding + 2-D sine-cosine positions, pre-norm blocks, final norm.

    No class token. The position embedding is a buffer (not a parameter) so it follows the
    module to its device and dtype and is never recomputed in ``forward``. With
    ``activation_checkpointing`` each block's activations are recomputed in the backward
    (``torch.utils.checkpoint``, non-reentrant) instead of being kept: same values and
    gradients, less memory, one more block forward per step.
    """

    def __init__(
        self,
        *,
        patch_dim: int,
        grid_size: int,
        embed_dim: int,
        num_blocks: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        eps: float = 1e-6,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.activation_checkpointing = activation_checkpointing
        self.embed_dim = embed_dim
        self.num_patches = grid_size * grid_size
        self.patch_embed = PatchEmbed(patch_dim, embed_dim, eps)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, eps) for _ in range(num_blocks)]
        )
        self.post_trunk_norm = nn.LayerNorm(embed_dim, eps=eps)
        pos = sincos_pos_embed_2d(grid_size, embed_dim)  # (K, D)
        self.register_buffer("pos_embed", pos, persistent=False)

    def forward(
        self,
        patches: torch.Tensor,
        mask: torch.Tensor | BlockMask | None = None,
        positions: torch.Tensor | None = None,
        num_blocks: int | None = None,
        masked: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the trunk.

        Args:
            patches: (B, K, P) normalized float patches in sequence order.
            mask: Boolean attention mask from :func:`attention_mask`, or a FlexAttention
                block mask from :func:`flex_block_mask` (None: bidirectional).
            positions: (K,) raster index of the patch at each sequence position (None: raster).
            num_blocks: Run only the first ``num_blocks`` blocks (None: all).
            masked: (B, K) bool; masked patches' embeddings are replaced by ``mask_token``
                (D,) before the position embedding is added (masked image modelling), so
                their pixels never enter the blocks.
            mask_token: (D,) the learnable mask token, required with ``masked``.

        Returns:
            ``(features, block_outputs)``: post-norm features (B, K, D) of the last block run,
            and the raw output of every block run, each (B, K, D).
        """
        pos = self.pos_embed if positions is None else self.pos_embed[positions]  # (K, D)
        x = self.patch_embed(patches)  # (B, K, D)
        if masked is not None:
            x = torch.where(masked.unsqueeze(-1), mask_token.to(x.dtype), x)  # (B, K, D)
        x = x + pos.to(patches.dtype)  # (B, K, D)
        outputs = []
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        for block in self.blocks[:num_blocks]:
            if recompute:
                x = checkpoint(block, x, mask, use_reentrant=False)  # (B, K, D)
            else:
                x = block(x, mask)  # (B, K, D)
            outputs.append(x)
        return self.post_trunk_norm(x), outputs

    def features(
        self,
        patches: torch.Tensor,
        layers: Sequence[int],
        attention: AttentionKind = "bidirectional",
    ) -> torch.Tensor:
        """Mean of the raw outputs of the chosen blocks (what the probes read).

        Args:
            patches: (B, K, P) normalized float patches in raster order.
            layers: Block indices (negative counts from the end).
            attention: ``bidirectional`` (downstream default) or ``causal``.

        Returns:
            (B, K, D).
        """
        n = len(self.blocks)
        idx = [i % n for i in layers]
        mask = attention_mask(attention, patches.shape[1], device=patches.device)
        _, outputs = self(patches, mask=mask, num_blocks=max(idx) + 1)
        return torch.stack([outputs[i] for i in idx]).mean(dim=0)  # (B, K, D)


def build_trunk(cfg: ModelConfig, activation_checkpointing: bool = False) -> AIMTrunk:
    """The trunk described by a :class:`ModelConfig` (see :class:`AIMTrunk` for the flag)."""
    trunk = AIMTrunk(
        patch_dim=cfg.patch_dim,
        grid_size=cfg.grid_size,
        embed_dim=cfg.embed_dim,
        num_blocks=cfg.num_blocks,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        eps=cfg.norm_eps,
        activation_checkpointing=activation_checkpointing,
    )
    init_weights(trunk)
    return trunk


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform linear weights, zero biases, unit LayerNorms (MAE/AIM style)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class AIMForPretraining(nn.Module):
    """Trunk + pixel head + loss, with the pattern, prefix, target and objective handled here.

    ``loss`` is the whole pre-training objective from uint8 patches: normalize the input,
    order the patches by the pattern (tokens, position embeddings and targets alike), build the
    attention mask, predict, and take the MSE on the patches after the prefix.

    Variants (paper Tables 3a and 5):

    - ``target: tokens``: the head outputs ``num_tokens`` logits per position and the loss is
      the cross-entropy against the next patch's k-means token (nearest centroid of its
      normalized pixels). The codebook is read from ``cfg.tokenizer`` at construction into the
      non-persistent buffer ``codebook`` (V, P); :meth:`set_codebook` replaces it.
    - ``objective: masked``: a random ``mask_ratio`` of patches per sample is replaced by the
      learnable ``mask_token`` (D,) after the patch embedding (position embeddings are still
      added), the trunk and a transformer head attend bidirectionally, each position predicts
      its own patch, and only masked patches carry loss. ``prefix_len`` is ignored.

    Args:
        cfg: The model; ``cfg.attention_backend`` picks SDPA with a boolean mask (``sdpa``, the
            CPU path) or FlexAttention with a block mask (``flex``, for GPUs).
        activation_checkpointing: Recompute each trunk block in the backward.
        storage_options: fsspec options to read ``cfg.tokenizer`` (target tokens only).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        activation_checkpointing: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.trunk = build_trunk(cfg, activation_checkpointing)
        tokens = cfg.target == "tokens"
        self.head = PixelHead(
            cfg.head.kind,
            in_dim=cfg.embed_dim,
            patch_dim=cfg.num_tokens if tokens else cfg.patch_dim,
            num_blocks=cfg.head.num_blocks,
            width=cfg.head.width,
            mlp_ratio=cfg.head.mlp_ratio,
            num_heads=cfg.head.num_heads,
            eps=cfg.norm_eps,
            causal=cfg.objective == "autoregressive",
        )
        init_weights(self.head)
        self.register_buffer("codebook", None, persistent=False)
        if tokens:
            url = str(cfg.tokenizer)
            self.set_codebook(load_codebook(url, cfg.num_tokens, cfg.patch_dim, storage_options))
        self.register_parameter("mask_token", None)
        if cfg.objective == "masked":
            self.mask_token = nn.Parameter(torch.empty(cfg.embed_dim))  # (D,)
            nn.init.normal_(self.mask_token, std=0.02)
        order = pattern_order(cfg.pattern, cfg.grid_size, cfg.pattern_seed)  # (K,)
        self.register_buffer("order", order, persistent=False)
        # Raster order is the identity: skip the per-step gathers of patches and positions.
        self.identity_order = cfg.pattern == "raster"

    def set_codebook(self, codebook: torch.Tensor) -> None:
        """Use ``codebook`` (num_tokens, P) as the k-means codebook of the token target."""
        shape = (self.cfg.num_tokens, self.cfg.patch_dim)
        if tuple(codebook.shape) != shape:
            raise ValueError(f"tokenizer: codebook shape {tuple(codebook.shape)} != {shape}")
        device = self.trunk.pos_embed.device
        self.codebook = codebook.detach().float().to(device)  # (V, P)

    def compile_blocks(self, **compile_kwargs) -> None:
        """``torch.compile`` every trunk and head block in place (per block, as torchtitan).

        Compiling blocks rather than the whole model keeps masks, the loss and the optimizer
        in eager mode, composes with activation checkpointing and FSDP2 (``fully_shard`` per
        block), and lets the blocks share one compiled graph.
        """
        for block in [*self.trunk.blocks, *self.head.blocks]:
            block.compile(**compile_kwargs)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        prefix_len: torch.Tensor | None = None,
        masked: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predictions in sequence order.

        Autoregressive: output k predicts the patch at position k+1. Masked: output k predicts
        the patch at position k, whose input was replaced by the mask token.

        Args:
            tokens: (B, K, P) normalized float patches in sequence (pattern) order.
            positions: (K,) raster index of each sequence position (None: raster).
            prefix_len: (B,) prefix lengths for ``prefix_causal`` attention.
            masked: (B, K) bool, the masked patches; required for the masked objective.

        Returns:
            (B, K, P) pixels, or (B, K, V) logits over the codebook for ``target: tokens``.
        """
        k = tokens.shape[1]
        if self.cfg.objective == "masked" and masked is None:
            raise ValueError("the masked objective needs masked (B, K), see sample_mask")
        if self.cfg.attention_backend == "flex":
            mask = flex_block_mask(self.cfg.attention, k, prefix_len, tokens.device)
        else:
            mask = attention_mask(self.cfg.attention, k, prefix_len, tokens.device)
        x, _ = self.trunk(
            tokens, mask=mask, positions=positions, masked=masked, mask_token=self.mask_token
        )  # (B, K, D)
        pos = self.trunk.pos_embed if positions is None else self.trunk.pos_embed[positions]
        return self.head(x + pos.to(x.dtype))  # (B, K, P) or (B, K, V)

    def targets(self, seq: torch.Tensor) -> torch.Tensor:
        """What each patch's prediction is scored against, in ``seq``'s order.

        Args:
            seq: (B, K, P) float model input (:func:`pixels_to_input`).

        Returns:
            (B, K, P) normalized or raw pixels, or (B, K) int64 token ids for ``tokens``.
        """
        if self.cfg.target == "raw":
            return seq
        normalized = normalize_patches(seq, self.cfg.target_eps)  # (B, K, P)
        if self.cfg.target == "tokens":
            return assign_tokens(normalized, self.codebook)  # (B, K)
        return normalized

    def loss(
        self,
        pixels: torch.Tensor,
        prefix_len: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """The pre-training loss on a batch of raster-order patches.

        Args:
            pixels: (B, K, P) uint8 patch sequences in raster order, as the pipeline delivers.
            prefix_len: (B,) prefix lengths; required for ``prefix_causal``, ignored otherwise
                (and always ignored by the masked objective).
            generator: Seed of the masks (masked objective; None: torch's global RNG).
        """
        x = pixels_to_input(pixels)  # (B, K, P) float
        if self.cfg.objective == "masked":
            return self._masked_loss(x, generator)
        seq = x if self.identity_order else x[:, self.order]  # (B, K, P) in pattern order
        positions = None if self.identity_order else self.order
        target = self.targets(seq)  # (B, K, P), or (B, K) token ids
        if self.cfg.attention != "prefix_causal":
            prefix_len = None
        elif prefix_len is None:
            raise ValueError("prefix_causal pre-training needs prefix_len (B,)")
        else:
            prefix_len = prefix_len.to(x.device, non_blocking=True)  # no stream sync
        pred = self(seq, positions=positions, prefix_len=prefix_len)  # (B, K, P) or (B, K, V)
        if self.cfg.target == "tokens":
            return next_token_loss(pred, target, prefix_len)
        return next_patch_loss(pred, target, prefix_len)

    def _masked_loss(self, x: torch.Tensor, generator: torch.Generator | None) -> LossOutput:
        """Masked image modelling on raster-order input ``x`` (B, K, P): loss on masked only."""
        b, k, _ = x.shape
        masked = sample_mask(b, k, self.cfg.mask_ratio, generator, x.device)  # (B, K)
        target = self.targets(x)  # (B, K, P), or (B, K) token ids
        pred = self(x, masked=masked)  # (B, K, P) or (B, K, V)
        if self.cfg.target == "tokens":
            return masked_token_loss(pred, target, masked)
        return masked_patch_loss(pred, target, masked)


class AIMClassifier(nn.Module):
    """Frozen-trunk classifier: bidirectional trunk, mean of chosen blocks, probe head.

    Matches the official AIM v1 ``AIMForImageClassification`` when built by
    :func:`aim_platform.models.interop.load_ml_aim_v1`.
    """

    def __init__(
        self,
        trunk: AIMTrunk,
        probe: AttentiveProbe | LinearProbe,
        layers: Sequence[int],
        patch_size: int,
    ) -> None:
        super().__init__()
        self.trunk = trunk
        self.probe = probe
        self.layers = list(layers)
        self.patch_size = patch_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized images -> (B, C) logits."""
        patches = patchify(images, self.patch_size)  # (B, K, P)
        return self.probe(self.trunk.features(patches, self.layers))  # (B, C)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (works on the ``meta`` device: nothing is allocated)."""
    return sum(p.numel() for p in module.parameters())

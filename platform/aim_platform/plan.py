"""``aimctl plan``: what a pre-training job costs before it runs (no Ray, no GPU).

Parameters are counted on the meta device (no memory is allocated), FLOPs come from
:func:`aim_platform.train.metrics.flops_per_image` and the device peak from its table. The
memory estimate is per GPU under FSDP2 with ``N`` workers:

- parameters (float32 master copy), gradients (float32) and AdamW's two moments (float32):
  16 bytes per parameter, sharded over ``N``;
- activations of one micro-batch: the tensors the forward saves for the backward (see
  :func:`activation_bytes_per_image`), at 2 bytes per value under bf16 autocast, 4 in float32.

Left out: the all-gathered (unsharded) block being computed, temporary buffers, the CUDA
context and allocator fragmentation; keep a margin of several GiB.
"""

from __future__ import annotations

from dataclasses import dataclass

from aim_platform.config import ConfigError, JobConfig, ModelConfig

GiB = 1024**3

# Device names as in train/metrics.py's table of peaks, and their memory in GiB.
GPUS: dict[str, tuple[str, float]] = {
    "h200": ("NVIDIA H200", 141.0),
    "h100": ("NVIDIA H100", 80.0),
    "a100": ("NVIDIA A100", 80.0),
    "b200": ("NVIDIA B200", 180.0),
    "l40s": ("NVIDIA L40S", 48.0),
}


def count_parameters_meta(cfg: ModelConfig) -> tuple[int, int]:
    """Parameters of the trunk (what Table 1 counts) and of the whole pre-training model
    (trunk + pixel head), built on the meta device."""
    import torch

    from aim_platform.models.aim import AIMForPretraining

    if cfg.target == "tokens":  # the codebook is read at construction: count without it
        cfg = cfg.model_copy(update={"target": "normalized", "tokenizer": None})
    with torch.device("meta"):
        model = AIMForPretraining(cfg)
    trunk = sum(p.numel() for p in model.trunk.parameters())
    return trunk, sum(p.numel() for p in model.parameters())


def activation_values_per_image(cfg: ModelConfig, checkpointing: bool = False) -> int:
    """Values the forward saves for the backward, per image (fused attention kernel).

    Per token: a trunk block (pre-norm, width D, MLP ratio r) saves its two LayerNorm inputs,
    the inputs of qkv, output projection and both MLP matrices, q, k, v and the attention
    output, and the GELU input: ``(9 + 2r) D``. A residual MLP head block of width W saves
    ``(2 + 2r) W``; the head's input and output maps save their inputs (D + W), the patch
    embedding its input (P) and the loss prediction and target (2P). With activation
    checkpointing a trunk block keeps only its input (D) and one block is recomputed at a time.
    Softmax statistics and LayerNorm means (a few values per token) are left out.
    """
    k, d, p = cfg.num_patches, cfg.embed_dim, cfg.patch_dim
    block = int((9 + 2 * cfg.mlp_ratio) * d)
    trunk = cfg.num_blocks * d + block if checkpointing else cfg.num_blocks * block
    w, head = cfg.head.width, cfg.head
    if head.kind == "none":
        head_values = d
    else:
        per_block = int((2 + 2 * head.mlp_ratio) * w)
        if head.kind == "transformer":
            per_block = int((9 + 2 * head.mlp_ratio) * w)
        head_values = d + head.num_blocks * per_block + w
    return k * (p + trunk + head_values + 2 * p)


@dataclass(frozen=True)
class Plan:
    """The cost of one job on ``gpus`` devices."""

    name: str
    gpus: int
    gpu: str
    trunk_parameters: int
    parameters: int
    flops_per_image: float
    steps: int
    images: int
    patches: int
    state_bytes_per_gpu: float
    activation_bytes: float
    activation_bytes_checkpointed: float
    checkpointing: bool
    memory_gib: float
    hours: float
    mfu: float

    def lines(self) -> list[str]:
        """Human-readable report, one fact a line."""
        act = self.activation_bytes_checkpointed if self.checkpointing else self.activation_bytes
        peak = self.state_bytes_per_gpu + act
        fits = "fits" if peak / GiB <= self.memory_gib else "does NOT fit"
        return [
            f"job {self.name} on {self.gpus} x {self.gpu}",
            f"parameters        {self.trunk_parameters / 1e9:.2f} B trunk (Table 1), "
            f"{self.parameters / 1e9:.2f} B with the pixel head",
            f"FLOPs per image   {self.flops_per_image / 1e12:.2f} TFLOP (forward + backward)",
            f"steps             {self.steps:,}",
            f"images seen       {self.images / 1e9:.2f} B ({self.patches / 1e12:.2f} T patches)",
            f"memory per GPU    params+grads+AdamW {self.state_bytes_per_gpu / GiB:.1f} GiB "
            f"(FSDP2 over {self.gpus})",
            f"  activations     {self.activation_bytes / GiB:.1f} GiB per micro-batch, "
            f"{self.activation_bytes_checkpointed / GiB:.1f} GiB with activation checkpointing",
            f"  total           {peak / GiB:.1f} GiB of {self.memory_gib:.0f} GiB ({fits}; "
            f"checkpointing {'on' if self.checkpointing else 'off'})",
            f"time              {self.hours:,.1f} h at MFU {self.mfu:.0%} "
            f"({self.hours * self.gpus:,.0f} GPU-hours)",
        ]


def plan(job: JobConfig, gpus: int, gpu: str = "h200", mfu: float = 0.4) -> Plan:
    """Estimate parameters, FLOPs, memory per GPU and wall-clock hours of ``job``.

    Args:
        job: A validated job config.
        gpus: Devices (FSDP2 shards over all of them; one worker each).
        gpu: A key of :data:`GPUS`.
        mfu: Model FLOPs utilization assumed for the time.

    Raises:
        ConfigError: An unknown GPU, or a count or MFU out of range.
    """
    import torch

    from aim_platform.train.metrics import flops_per_image, peak_flops

    if gpu not in GPUS:
        raise ConfigError(f"--gpu: unknown {gpu!r}; known: {', '.join(GPUS)}")
    if gpus < 1:
        raise ConfigError(f"--gpus: {gpus} must be at least 1")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu: {mfu} must lie in (0, 1]")
    device, memory = GPUS[gpu]
    cfg = job.model
    bf16 = job.train.precision != "fp32"
    peak = peak_flops(device, torch.bfloat16 if bf16 else torch.float32, job.train.peak_flops)
    assert peak is not None  # every GPUS entry is in the table
    trunk, n = count_parameters_meta(cfg)
    fpi = flops_per_image(cfg)
    images = job.train.steps * job.train.global_batch_size
    value_bytes = 2 if bf16 else 4
    micro = job.train.micro_batch_size
    return Plan(
        name=job.name,
        gpus=gpus,
        gpu=device,
        trunk_parameters=trunk,
        parameters=n,
        flops_per_image=fpi,
        steps=job.train.steps,
        images=images,
        patches=images * cfg.num_patches,
        state_bytes_per_gpu=16 * n / gpus,
        activation_bytes=micro * activation_values_per_image(cfg) * value_bytes,
        activation_bytes_checkpointed=micro
        * activation_values_per_image(cfg, checkpointing=True)
        * value_bytes,
        checkpointing=job.train.activation_checkpointing,
        memory_gib=memory,
        hours=images * fpi / (gpus * peak * mfu) / 3600,
        mfu=mfu,
    )

"""Typed configuration: pydantic models, YAML loading and ``--set a.b=c`` overrides.

Every config model forbids unknown keys, and impossible combinations fail with a
:class:`ConfigError` whose message names the field (``model.embed_dim: ...``).

Over 400 lines on purpose: every config of the platform in one file, so the whole schema reads
in one place (DESIGN.md).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from aim_platform.errors import PlatformError
from aim_platform.models.sizes import SIZES

# Pre-training attention; downstream runs the trunk bidirectionally (or causally for Table 3d
# probes), which the autoregressive objective cannot: every position would see its target.
# ``bidirectional`` is valid only with the masked objective (Table 5), and required there.
# Images above this many pixels are decompression bombs (Pillow's default MAX_IMAGE_PIXELS):
# the default of ingest (`--max-pixels`), of `data.max_pixels` and of every decode.
MAX_PIXELS = 89_478_485

PretrainAttention = Literal["prefix_causal", "causal", "bidirectional"]
PatternKind = Literal["raster", "spiral", "checkerboard", "random"]
HeadKind = Literal["none", "mlp", "transformer"]
TargetKind = Literal["normalized", "raw", "tokens"]
ObjectiveKind = Literal["autoregressive", "masked"]


class ConfigError(PlatformError, ValueError):
    """A configuration that cannot be used; the message names each offending field."""


PLACEHOLDER = "set-me:"
"""Prefix of a URL a recipe leaves for the user to set (``set-me:DFN-2B ingest root``): a job
holding one fails validation with a message naming the field and how to set it, except when
validated with ``allow_placeholders`` (a study spec checked before its data exists)."""


_HERE = "<this field>"  # replaced by the field's dotted path in the error message


def _no_placeholder(value: str | None, info: ValidationInfo) -> str | None:
    """Reject a ``set-me:`` URL unless the validation context allows placeholders."""
    if value is None or not value.startswith(PLACEHOLDER):
        return value
    if (info.context or {}).get("allow_placeholders"):
        return value
    what = value.removeprefix(PLACEHOLDER).strip()
    raise ValueError(f"is a placeholder ({what}): set it with --set {_HERE}=URL")


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class HeadConfig(StrictModel):
    """Pixel head on top of the trunk (paper Section 3 and Table 3e/4)."""

    kind: HeadKind = "mlp"
    num_blocks: int = Field(12, ge=0, description="residual MLP or transformer blocks")
    width: int = Field(2048, ge=1, description="width of the head's blocks")
    mlp_ratio: float = Field(4.0, gt=0)
    num_heads: int = Field(8, ge=1, description="attention heads (transformer head only)")


class ModelConfig(StrictModel):
    """An AIM model: trunk shapes, attention, autoregression pattern, head, target, objective.

    ``target: tokens`` needs ``tokenizer`` (a codebook from ``aimctl tokenizer-fit``, or
    ``auto``: the pre-training job fits one); ``objective: masked`` needs ``attention: bidirectional``.

    ``size`` names a registered variant (``aim-600M``, ``aim-tiny``, ...) whose shapes fill
    every field that is not given explicitly.
    """

    size: str | None = "aim-tiny"
    img_size: int = Field(..., ge=1)
    patch_size: int = Field(..., ge=1)
    embed_dim: int = Field(..., ge=2)
    num_blocks: int = Field(..., ge=1)
    num_heads: int = Field(..., ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    norm_eps: float = Field(1e-6, gt=0)
    head: HeadConfig = HeadConfig()
    attention: PretrainAttention = "prefix_causal"
    attention_backend: Literal["sdpa", "flex"] = Field(
        "sdpa", description="sdpa: boolean mask (CPU); flex: FlexAttention block mask (GPU)"
    )
    pattern: PatternKind = "raster"
    pattern_seed: int = 0
    prefix_min: int = Field(1, description="smallest prefix length S (prefix_causal only)")
    prefix_max: int | None = Field(None, description="largest prefix length S; None: K-1")
    target: TargetKind = "normalized"
    target_eps: float = Field(1e-6, gt=0)
    tokenizer: str | None = Field(
        None,
        description="k-means codebook (aimctl tokenizer-fit) path or URL, for target=tokens; "
        "auto: the pre-training job fits one into the run's storage",
    )
    num_tokens: int = Field(512, ge=2, description="codebook size (target=tokens)")
    objective: ObjectiveKind = Field(
        "autoregressive", description="autoregressive (next patch) or masked (Table 5)"
    )
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="share of patches masked (masked)")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_size(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        size = data.get("size", cls.model_fields["size"].default)
        if size is None:
            return data
        if size not in SIZES:
            raise ValueError(f"size: unknown size {size!r}; registered: {', '.join(SIZES)}")
        spec = SIZES[size]
        for name in ("img_size", "patch_size", "embed_dim", "num_blocks", "num_heads"):
            data.setdefault(name, getattr(spec, name))
        head = data.get("head")
        if head is None or isinstance(head, dict):
            head = dict(head or {})
            head.setdefault("num_blocks", spec.head_blocks)
            head.setdefault("width", spec.head_width)
            data["head"] = head
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        problems = []
        if self.embed_dim % self.num_heads:
            problems.append(
                f"embed_dim: {self.embed_dim} is not divisible by num_heads={self.num_heads}"
            )
        elif (self.embed_dim // self.num_heads) % 2:
            problems.append(f"embed_dim: head dim {self.embed_dim // self.num_heads} must be even")
        if self.embed_dim % 4:
            problems.append(
                f"embed_dim: {self.embed_dim} must be divisible by 4 (2-D sine-cosine embedding)"
            )
        if self.img_size % self.patch_size:
            problems.append(
                f"img_size: {self.img_size} is not divisible by patch_size={self.patch_size}"
            )
        k = (self.img_size // self.patch_size) ** 2
        if k < 2:
            problems.append(f"patch_size: {self.patch_size} leaves {k} patch(es); need at least 2")
        if self.attention == "prefix_causal" and k >= 2:
            hi = k - 1 if self.prefix_max is None else self.prefix_max
            if not 1 <= self.prefix_min <= k - 1:
                problems.append(f"prefix_min: {self.prefix_min} is outside [1, K-1] = [1, {k - 1}]")
            if not 1 <= hi <= k - 1:
                problems.append(f"prefix_max: {hi} is outside [1, K-1] = [1, {k - 1}]")
            if self.prefix_min > hi:
                problems.append(f"prefix_min: {self.prefix_min} is larger than prefix_max={hi}")
        problems += self._objective_problems()
        if self.head.kind == "transformer" and self.head.width % self.head.num_heads:
            problems.append(
                f"head.width: {self.head.width} is not divisible by head.num_heads="
                f"{self.head.num_heads}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _objective_problems(self) -> list[str]:
        """Impossible objective/target/attention combinations, each naming its field."""
        problems = []
        if self.objective == "autoregressive" and self.attention == "bidirectional":
            problems.append(
                "attention: bidirectional lets every position see the patch it predicts; "
                "it is valid only with objective=masked"
            )
        if self.objective == "masked" and self.attention != "bidirectional":
            problems.append(
                f"attention: {self.attention} with objective=masked; masked image modelling "
                "uses bidirectional attention (set attention=bidirectional)"
            )
        if self.objective == "masked" and self.pattern != "raster":
            problems.append(
                f"pattern: {self.pattern} applies to the autoregressive objective only "
                "(masked needs raster)"
            )
        if self.target == "tokens" and not self.tokenizer:
            problems.append(
                "tokenizer: required with target=tokens (a codebook path or URL from "
                "aimctl tokenizer-fit, or auto)"
            )
        if self.target != "tokens" and self.tokenizer is not None:
            problems.append(f"tokenizer: set but target is {self.target} (only used by tokens)")
        return problems

    @property
    def grid_size(self) -> int:
        """Patches along one side of the image."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """K, the length of the patch sequence."""
        return self.grid_size**2

    @property
    def patch_dim(self) -> int:
        """Values per patch: patch_size * patch_size * 3."""
        return self.patch_size * self.patch_size * 3

    @property
    def prefix_range(self) -> tuple[int, int]:
        """Inclusive range of the prefix length S sampled in pre-training."""
        hi = self.num_patches - 1 if self.prefix_max is None else self.prefix_max
        return self.prefix_min, hi


class OptimConfig(StrictModel):
    """AdamW with linear warm-up then cosine decay (no decay on norms and biases)."""

    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    min_lr: float = Field(0.0, ge=0, description="learning rate at the end of the cosine")
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; None: off")

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr: {self.min_lr} is larger than lr={self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: {self.betas} must lie in [0, 1)")
        return self


class TrainConfig(StrictModel):
    """Distributed pre-training: scale, batch, precision, cadence of validation/checkpoints."""

    steps: int = Field(100, ge=1, description="optimizer steps")
    num_workers: int = Field(2, ge=1, description="Ray Train workers")
    cpus_per_worker: float = Field(0.5, gt=0, description="logical CPUs each worker reserves")
    use_gpu: Literal["auto"] | bool = Field(
        "auto",
        description="auto: one GPU per worker when the cluster has GPUs (decided on the driver "
        "when the job starts, aim_platform.cluster.resolve_use_gpu), else CPUs; true/false",
    )
    gpus_per_worker: float = Field(
        1.0,
        gt=0,
        le=1,
        description="share of a GPU each worker takes with use_gpu: a fraction puts workers of "
        "several jobs (study trials: aimctl study --gpus-per-trial) on one GPU",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how workers are placed on nodes (SPREAD: one per node if possible)"
    )
    global_batch_size: int = Field(64, ge=1, description="images per optimizer step")
    micro_batch_size: int = Field(32, ge=1, description="images per worker per forward")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 mixed precision on GPU, float32 on CPU"
    )
    activation_checkpointing: bool = False
    compile: bool = False
    val_every: int = Field(50, ge=1, description="validate every N steps (and at the end)")
    checkpoint_every: int = Field(50, ge=1, description="checkpoint every N steps (and at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="keep the latest k checkpoints")
    log_every: int = Field(10, ge=1)
    max_failures: int = Field(
        0, ge=-1, description="restarts from the last checkpoint after a failure; -1: unlimited"
    )
    min_workers: int = Field(
        1,
        ge=1,
        description="a restart after a lost node goes on with as few as this many workers "
        "(num_workers: wait for the lost CPUs instead)",
    )
    restart_wait_s: float = Field(
        600.0, ge=0, description="how long a restart waits for CPUs for min_workers"
    )
    restart_settle_s: float = Field(
        30.0,
        ge=0,
        description="after a failure, how long to wait for Ray to report lost nodes before "
        "restarting (Ray's health checks take about 15 s to declare a node dead)",
    )
    step_timeout_s: float = Field(
        600.0,
        gt=0,
        description="a rank that makes no step for this long (after its first step; "
        "validation and checkpoints excepted) ends and the job restarts from its checkpoint",
    )
    preempt_grace_s: float = Field(
        60.0,
        gt=0,
        description="after SIGTERM (a pod deleted, a spot node reclaimed), how long the "
        "checkpoint at the next step boundary may take before the run stops without it",
    )
    storage_path: str = Field("./runs", description="any fsspec URL: folder or s3://bucket/x")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for storage_path (endpoint_url, region); credentials come "
        "from the environment (AWS_ACCESS_KEY_ID, ...) and are redacted if given here",
    )
    storage_shared: bool = Field(
        False,
        description="a local storage_path is a filesystem every node mounts (NFS, a PVC): "
        "allows it on a cluster of several nodes (see aim_platform.jobs.durable)",
    )
    lease_ttl_s: float = Field(
        120.0,
        gt=0,
        description="the run's lease (<storage>/<name>/lease.json) is taken over by another "
        "run once its holder has not renewed it for this long (see aim_platform.jobs.lease)",
    )
    warmup_throughput_steps: int = Field(3, ge=0, description="steps excluded from images/s")
    peak_flops: float | None = Field(None, gt=0, description="override the device peak for MFU")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.min_workers > self.num_workers:
            raise ValueError(
                f"min_workers: {self.min_workers} is more than num_workers={self.num_workers}"
            )
        per_step = self.micro_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size: {self.global_batch_size} is not a multiple of "
                f"micro_batch_size x num_workers = {self.micro_batch_size} x "
                f"{self.num_workers}"
            )
        return self

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches each worker accumulates per optimizer step."""
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)


class TrackingConfig(StrictModel):
    """MLflow: where runs go. None: $MLFLOW_TRACKING_URI, else a SQLite file in storage.

    Writes wait in a queue that training never waits on: ``buffer_size`` writes (one per
    logged step, plus system metrics) are held while the server does not answer, more are
    dropped and counted; at the end, queued writes get ``flush_timeout_s`` seconds.
    """

    tracking_uri: str | None = None
    experiment: str = Field("aim-pretrain", min_length=1)
    buffer_size: int = Field(10_000, ge=1)
    flush_timeout_s: float = Field(60.0, ge=0)


class DataSource(StrictModel):
    """One ingested dataset (``aimctl ingest`` output) and its weight in the mixture.

    ``url`` is any fsspec URL of an ingest root (it holds ``_manifest.json``), or
    ``builtin:digits`` / ``builtin:photos``, ingested once into a local cache folder.
    """

    url: str = Field(..., min_length=1)
    weight: float = Field(1.0, gt=0, description="sampling weight (normalized over sources)")
    name: str | None = Field(None, description="the rows' `source`; None: last part of url")

    @field_validator("url")
    @classmethod
    def _url_set(cls, value: str, info: ValidationInfo) -> str:
        return _no_placeholder(value, info) or value

    @property
    def source_name(self) -> str:
        """The name carried in each row's ``source`` column."""
        if self.name:
            return self.name
        return self.url.rstrip("/").rsplit("/", 1)[-1].removeprefix("builtin:")


class DataConfig(StrictModel):
    """Parquet shards -> Ray Data -> uint8 patch sequences (see ``aim_platform.data``)."""

    sources: list[DataSource] = Field(
        default_factory=lambda: [DataSource(url="builtin:digits")], min_length=1
    )
    val_url: str | None = Field(None, description="ingest root for validation; None: sources")
    val_limit: int | None = Field(
        None,
        ge=1,
        description="validate on the first N val rows (a hashed, class-mixed sample); None: all",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options (endpoint_url, ...); no secrets here"
    )
    samples_per_epoch: int | None = Field(
        None, ge=1, description="rows drawn per epoch; None: the sources' train rows in total"
    )
    crop_scale: tuple[float, float] = (0.4, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = Field(0.5, ge=0, le=1)
    max_pixels: int = Field(MAX_PIXELS, ge=1, description="larger images count as corrupt")
    decode_batch_size: int = Field(32, ge=1, description="rows per decode task call")
    decode_concurrency: int | None = Field(None, ge=1, description="max decode tasks at once")
    cpus_per_task: float = Field(0.5, ge=0, description="logical CPUs per read/decode task")
    prefetch_batches: int = Field(2, ge=0, description="batches prefetched by the consumer")
    local_shuffle_buffer: int = Field(0, ge=0, description="consumer-side shuffle rows; 0: off")
    preserve_order: bool = Field(True, description="deterministic row order (same seed)")
    max_shard_failures: int = Field(
        3, ge=1, description="failed reads of one shard (across restarts) before giving up on it"
    )
    skip_bad_shards: bool = Field(
        False, description="past max_shard_failures, train without the shard instead of failing"
    )

    def crop_args(self) -> dict[str, Any]:
        """The training view's settings as :func:`~aim_platform.data.transforms.decode_batch`
        takes them (``scale``, ``ratio``, ``flip_prob``, ``max_pixels``)."""
        return {
            "scale": tuple(self.crop_scale),
            "ratio": tuple(self.crop_ratio),
            "flip_prob": self.flip_prob,
            "max_pixels": self.max_pixels,
        }

    @field_validator("val_url")
    @classmethod
    def _val_url_set(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _no_placeholder(value, info)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        problems = []
        lo, hi = self.crop_scale
        if lo > hi:
            problems.append(f"crop_scale: lower bound {lo} > upper {hi}")
        elif not 0 < lo <= hi <= 1:
            problems.append(f"crop_scale: ({lo}, {hi}) must lie in (0, 1]")
        rlo, rhi = self.crop_ratio
        if rlo > rhi:
            problems.append(f"crop_ratio: lower bound {rlo} > upper {rhi}")
        elif rlo <= 0:
            problems.append(f"crop_ratio: ({rlo}, {rhi}) must be positive")
        names = [s.source_name for s in self.sources]
        if len(set(names)) != len(names):
            problems.append(f"sources: names {names} are not unique; set `name` on each")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ProbeConfig(StrictModel):
    """Frozen-trunk probes (paper Section 5, eq. 4; Tables 7 and 8)."""

    dataset: str | None = Field(
        None, description="labelled ingest root (aimctl ingest); None: the first data source"
    )
    storage_options: dict[str, Any] = Field(default_factory=dict)
    kind: Literal["attentive", "linear", "both"] = "attentive"
    layers: list[int] | None = Field(
        None,
        description="blocks whose outputs are averaged; None: the last `window` blocks "
        "(the official probes average the last 6)",
    )
    window: int = Field(
        6, ge=1, description="blocks per averaged window: the default main probe and the sweep"
    )
    sweep: bool = Field(
        True,
        description="also probe every block on its own and every window of `window` "
        "consecutive blocks (Table 7's best layer)",
    )
    labels_per_class: int | None = Field(None, ge=1, description="None: every train label")
    views: int = Field(4, ge=1, description="augmented crops per training image")
    steps: int = Field(300, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    attention: Literal["bidirectional", "causal"] = "bidirectional"
    lora_rank: int | None = Field(None, ge=1, description="train rank-r LoRA with the probe")
    lora_placement: Literal["official", "qkv_proj"] = Field(
        "official",
        description="official: q and v of attn.qkv plus attn.proj (apple/ml-aim's "
        "LoraAttention); qkv_proj: the whole qkv plus proj",
    )
    lora_alpha: float | None = Field(
        None, gt=0, description="scale alpha/r; None: 1 for official (loralib), r for qkv_proj"
    )
    cache_dir: str | None = Field(
        None,
        description="where averaged features are cached in shards (fsspec URL, e.g. on the "
        "run's storage); None: a temporary local folder removed afterwards",
    )
    seed: int = 0
    at_steps: list[int] = Field(
        default_factory=list,
        description="pre-training steps whose trunk is probed (the final trunk always is)",
    )

    @field_validator("dataset")
    @classmethod
    def _dataset_set(cls, value: str | None, info: ValidationInfo) -> str | None:
        return _no_placeholder(value, info)

    def resolved_layers(self, num_blocks: int) -> list[int]:
        """Block indices (0-based, ascending) the main probe averages."""
        if self.layers is None:
            n = min(self.window, num_blocks)
            return list(range(num_blocks - n, num_blocks))
        out = sorted({i % num_blocks for i in self.layers})
        return out

    def windows(self, num_blocks: int) -> list[list[int]]:
        """Every run of ``window`` consecutive blocks (one window of all blocks when fewer)."""
        w = min(self.window, num_blocks)
        return [list(range(a, a + w)) for a in range(num_blocks - w + 1)]


class JobConfig(StrictModel):
    """Root of a job's configuration (extended by the data, training and eval sections)."""

    name: str = Field("aim-run", min_length=1)
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    probe: ProbeConfig | None = Field(None, description="probe after (and during) pre-training")


Scale = Literal["tiny", "small", "cifar10", "paper"]
SCALES: tuple[str, ...] = ("tiny", "small", "cifar10", "paper")


class StudySpec(StrictModel):
    """A Ray Tune ablation study (one of the paper's Tables 3-5): a base job, named variants
    (each a list of ``a.b=c`` overrides, one trial each) and budget presets per scale."""

    name: str = Field(..., min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    table: str = Field(..., description="the paper's table, e.g. 3b")
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict, description="JobConfig fields")
    base_overrides: list[str] = Field(default_factory=list)
    variants: dict[str, list[str]] = Field(..., min_length=2)
    scales: dict[Scale, list[str]] = Field(..., description="budget overrides per scale")
    variant_scales: dict[Scale, dict[str, list[str]]] = Field(
        default_factory=dict,
        description="per scale, overrides applied after a variant's own (Table 4's head shapes "
        "scaled to each preset's trunk)",
    )
    metric: str = Field("val/loss", description="what ASHA minimizes")
    asha: bool = False
    max_concurrent_trials: int = Field(1, ge=1)
    paper: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="row (linear/attentive) -> variant -> paper top-1"
    )
    directions: dict[Literal["linear", "attentive", "val_loss"], list[str]] = Field(
        default_factory=dict,
        description="row -> 'a > b' (a better: higher top-1, lower loss): what the paper's "
        "text says where its table has no numbers (Table 3d, Fig. 1)",
    )

    @model_validator(mode="after")
    def _check(self) -> StudySpec:
        missing = [s for s in ("tiny", "paper") if s not in self.scales]
        if missing:
            raise ValueError(f"scales: missing presets {missing} (tiny and paper are required)")
        for row, cols in self.paper.items():
            unknown = set(cols) - set(self.variants)
            if unknown:
                raise ValueError(f"paper: row {row!r} names unknown variants {sorted(unknown)}")
        for row, texts in self.directions.items():
            for text in texts:
                parts = [p.strip() for p in text.split(">")]
                if len(parts) != 2 or not set(parts) <= set(self.variants) or len(set(parts)) < 2:
                    raise ValueError(
                        f"directions: {row}: {text!r} must read 'a > b' with two of the "
                        f"variants ({', '.join(self.variants)})"
                    )
        for scale, by_variant in self.variant_scales.items():
            unknown = set(by_variant) - set(self.variants)
            if unknown:
                raise ValueError(
                    f"variant_scales: scale {scale!r} names unknown variants {sorted(unknown)}"
                )
            if scale not in self.scales:
                raise ValueError(f"variant_scales: no preset {scale!r} in scales")
        return self

    def job(
        self,
        variant: str,
        scale: Scale,
        extra: list[str] | None = None,
        *,
        allow_placeholders: bool = False,
    ) -> JobConfig:
        """The validated job of one variant at one scale (placeholder URLs fail unless
        ``allow_placeholders``: checking a spec before its data is set)."""
        if variant not in self.variants:
            raise ConfigError(f"variants: unknown variant {variant!r}")
        if scale not in self.scales:
            raise ConfigError(f"scales: no preset {scale!r} in study {self.name!r}")
        overrides = [*self.base_overrides, *self.scales[scale], *self.variants[variant]]
        overrides += self.variant_scales.get(scale, {}).get(variant, [])
        overrides += [f"name={self.name}-{scale}-{variant}", *(extra or [])]
        return build_config(JobConfig, self.base, overrides, allow_placeholders=allow_placeholders)


C = TypeVar("C", bound=BaseModel)


def _format_validation_error(err: ValidationError) -> str:
    """One line per problem, each starting with the dotted path of the field it names."""
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ").replace(_HERE, where)
        if e["type"] == "value_error" and _NAMED.match(msg):
            # A model-level check names its own fields: "embed_dim: ...; img_size: ...".
            for part in msg.split("; "):
                lines.append(f"{where}.{part}" if where else part)
        else:
            lines.append(f"{where}: {msg}" if where else msg)
    return "invalid configuration:\n  " + "\n  ".join(lines)


_NAMED = re.compile(r"^[A-Za-z_][\w.]*: ")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b=c`` into a key path and a YAML-parsed value (``1`` -> int, ``[1,2]`` -> list)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override {item!r}: value is not valid YAML: {yaml_problem(exc)}"
        ) from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b=c`` override set (nested dicts created).

    A numeric part indexes a list that exists: ``data.sources.0.url=s3://b/x`` sets the first
    source's URL (how a recipe's placeholder URLs are filled in).
    """
    out = _deep_copy(data)
    for item in overrides:
        path, value = parse_override(item)
        node: Any = out
        for i, part in enumerate(path):
            where = ".".join(path[: i + 1])
            last = i == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"override {item!r}: {where} is not an index of a list of {len(node)}"
                    )
                key: Any = int(part)
            else:
                key = part
            if last:
                node[key] = value
                break
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]
            if not isinstance(node, dict | list):
                raise ConfigError(f"override {item!r}: {where} is a value, not a section")
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def build_config(
    cls: type[C],
    data: dict[str, Any],
    overrides: list[str] | None = None,
    *,
    allow_placeholders: bool = False,
) -> C:
    """Validate ``data`` (plus overrides) into ``cls``; errors become :class:`ConfigError`.

    ``allow_placeholders`` accepts ``set-me:`` URLs (see :data:`PLACEHOLDER`).
    """
    merged = apply_overrides(data, overrides or [])
    try:
        return cls.model_validate(merged, context={"allow_placeholders": allow_placeholders})
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: where and what. Configs are read with ``yaml.safe_load``, so a
    tag that would build a Python object (``!!python/object/apply:os.system``) is only ever
    this error, never a call."""
    mark = getattr(exc, "problem_mark", None)
    problem = (getattr(exc, "problem", None) or str(exc) or type(exc).__name__).strip()
    problem = problem.splitlines()[0]
    if "python/" in problem:
        problem += " (tags that build Python objects are never loaded)"
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, cls: type[C] = JobConfig
) -> C:
    """Load a YAML config file (or defaults when ``path`` is None) with overrides applied."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"config file {str(p)!r} is not valid YAML: {yaml_problem(exc)}"
            ) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
        data = loaded
    return build_config(cls, data, overrides)


def dump_config(config: BaseModel) -> str:
    """The config as YAML (what checkpoints and MLflow store; never a pickled object)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out

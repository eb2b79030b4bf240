"""K-means patch tokenizer for the discrete-token target (paper Table 3a).

A codebook of V centroids is fitted with scikit-learn's k-means (k-means++ seeding, Lloyd
iterations, on the CPU) on patch vectors normalized exactly as the pixel target is (:func:`patch_vectors`: the model
input of :func:`~aim_platform.models.layers.pixels_to_input`, then
:func:`~aim_platform.models.losses.normalize_patches`). A patch's token is the index of its
nearest centroid (squared Euclidean distance), computed in torch on whatever device the
patches are on (the training device).

A codebook is one safetensors file: the tensor ``codebook`` (V, P) float32, and in the
safetensors header's ``__metadata__`` the format name, ``num_tokens``, ``patch_dim``, ``eps``
and a JSON ``fitted_on`` record. No pickles. It lives at any local path or fsspec URL.

Shapes: N patch vectors, P = patch*patch*3 values each, V centroids (tokens), B batch, K patches.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from aim_platform.errors import UnsafeFile
from aim_platform.models.layers import pixels_to_input
from aim_platform.models.losses import normalize_patches

FORMAT = "aim-platform/kmeans-codebook-v1"
AUTO = "auto"  # ModelConfig.tokenizer value: the launcher fits a codebook for the run
CHUNK_ROWS = 16384  # rows of the (N, V) distance matrix computed at once


def patch_vectors(pixels: torch.Tensor | np.ndarray, eps: float = 1e-6) -> torch.Tensor:
    """uint8 patches -> the per-patch-normalized vectors that tokens are defined on.

    Args:
        pixels: (..., P) uint8 patches (e.g. (B, K, P) or (N, P)), channel last in a patch.
        eps: Variance epsilon of :func:`normalize_patches` (the model's ``target_eps``).

    Returns:
        (N, P) float32 with N the product of the leading dimensions.
    """

    x = torch.as_tensor(pixels)
    p = x.shape[-1]
    x = x.reshape(1, -1, p)  # (1, N, P)
    return normalize_patches(pixels_to_input(x), eps)[0]  # (N, P)


def nearest_centroid(
    x: torch.Tensor, centroids: torch.Tensor, chunk: int = CHUNK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row by squared Euclidean distance, in row chunks.

    Uses ``|x|^2 - 2 x.c + |c|^2`` in float32 with autocast off (a bf16 matmul would pick
    wrong neighbours), ``chunk`` rows at a time so memory stays at ``chunk x V`` floats.

    Args:
        x: (N, P) vectors.
        centroids: (V, P).
        chunk: Rows per distance block.

    Returns:
        ``(ids, sqdist)``: (N,) int64 index of the nearest centroid and (N,) float32 squared
        distance to it.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        c = centroids.float().to(x.device)  # (V, P)
        c2 = c.pow(2).sum(dim=1)  # (V,)
        ids, dists = [], []
        for rows in x.split(chunk):  # (n, P) each
            d = rows.pow(2).sum(dim=1, keepdim=True) - 2 * rows @ c.T + c2  # (n, V)
            best, idx = d.min(dim=1)  # (n,), (n,)
            ids.append(idx)
            dists.append(best.clamp_min(0))
    return torch.cat(ids), torch.cat(dists)  # (N,), (N,)


def assign_tokens(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Token id of each normalized patch vector: its nearest centroid.

    Args:
        vectors: (..., P) float normalized patches (see :func:`patch_vectors`).
        codebook: (V, P).

    Returns:
        (...) int64, e.g. (B, K) for (B, K, P) input.
    """
    lead = vectors.shape[:-1]
    ids, _ = nearest_centroid(vectors.reshape(-1, vectors.shape[-1]), codebook)  # (N,)
    return ids.reshape(lead)  # (...)


@dataclass
class KMeansResult:
    """Centroids, the mean squared distance of a row to its nearest centroid (inertia / N) and
    the Lloyd iterations run."""

    centroids: torch.Tensor
    inertia: float
    iterations: int


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> KMeansResult:
    """Seeded k-means: scikit-learn's ``KMeans`` (k-means++ seeding, then at most ``iters``
    Lloyd iterations, stopping once no row changes cluster), on the CPU.

    Only the fit runs here; assigning tokens during training stays on the training device
    (:func:`assign_tokens`).

    Args:
        x: (N, P) float rows, N >= k.
        k: Number of centroids.
        iters: Maximum Lloyd iterations.
        seed: Seed of the k-means++ draws (same seed and data: same centroids).

    Returns:
        :class:`KMeansResult` with (k, P) float32 centroids.

    Raises:
        ValueError: fewer rows than centroids.
    """
    from sklearn.cluster import KMeans

    rows = x.detach().float().cpu().numpy()  # (N, P) float32
    n = rows.shape[0]
    if n < k:
        raise ValueError(f"num_tokens: {k} centroids need at least {k} patches, got {n}")
    fit = KMeans(
        n_clusters=k,
        init="k-means++",
        n_init=1,
        max_iter=iters,
        tol=0.0,  # stop on unchanged assignments only, not on a small centroid shift
        algorithm="lloyd",
        random_state=seed,
    ).fit(rows)
    centroids = torch.from_numpy(fit.cluster_centers_).float()  # (k, P)
    return KMeansResult(centroids, float(fit.inertia_) / n, int(fit.n_iter_))


@dataclass
class Tokenizer:
    """A fitted codebook and how to turn patches into token ids.

    Attributes:
        codebook: (V, P) float32 centroids in normalized-patch space.
        eps: Variance epsilon of the patch normalization it was fitted with.
        fitted_on: What it was fitted on (dataset, sizes, counts, seed, inertia): provenance.
    """

    codebook: torch.Tensor
    eps: float = 1e-6
    fitted_on: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """V, the codebook size."""
        return int(self.codebook.shape[0])

    @property
    def patch_dim(self) -> int:
        """P, values per patch."""
        return int(self.codebook.shape[1])

    def assign(self, vectors: torch.Tensor) -> torch.Tensor:
        """(..., P) normalized patch vectors -> (...) int64 nearest-centroid ids."""
        return assign_tokens(vectors, self.codebook)

    def encode(self, pixels: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(B, K, P) uint8 patches -> (B, K) int64 token ids (normalizes, then assigns)."""
        x = torch.as_tensor(pixels)
        return self.assign(patch_vectors(x, self.eps)).reshape(x.shape[:-1])  # (B, K)

    def to_bytes(self) -> bytes:
        """The safetensors file: the codebook tensor and the JSON-valued metadata header."""
        metadata = {
            "format": FORMAT,
            "num_tokens": str(self.num_tokens),
            "patch_dim": str(self.patch_dim),
            "eps": repr(float(self.eps)),
            "fitted_on": json.dumps(self.fitted_on, sort_keys=True),
        }
        codebook = self.codebook.detach().float().cpu().contiguous()  # (V, P)
        return st_save({"codebook": codebook}, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes) -> Tokenizer:
        """Parse :meth:`to_bytes` output; checks the format and the shapes it declares."""
        meta = read_metadata(data)
        if meta.get("format") != FORMAT:
            raise ValueError(f"not a codebook file: format {meta.get('format')!r} != {FORMAT!r}")
        codebook = st_load(data)["codebook"]  # (V, P)
        shape = (int(meta["num_tokens"]), int(meta["patch_dim"]))
        if tuple(codebook.shape) != shape:
            raise ValueError(f"codebook shape {tuple(codebook.shape)} != header {shape}")
        return cls(codebook, float(meta["eps"]), json.loads(meta.get("fitted_on", "{}")))

    def save(self, url: str, storage_options: dict[str, Any] | None = None) -> str:
        """Write the codebook file to a local path or fsspec URL; returns ``url``."""
        from aim_platform.storage import filesystem  # fsspec: only when used

        fs, path = filesystem(url, storage_options)
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(self.to_bytes())
        return url

    @classmethod
    def load(cls, url: str, storage_options: dict[str, Any] | None = None) -> Tokenizer:
        """Read a codebook file written by :meth:`save`."""
        if url == AUTO:
            raise ValueError(
                "tokenizer: 'auto' is a request for the launcher to fit a codebook into the "
                "run's storage; give a codebook path or URL here"
            )
        from aim_platform.storage import filesystem

        fs, path = filesystem(url, storage_options)
        if not fs.exists(path):
            raise FileNotFoundError(f"tokenizer: no codebook at {url!r} (aimctl tokenizer-fit)")
        with fs.open(path, "rb") as f:
            data = f.read()
        try:  # safetensors + a JSON header: nothing in the file can run
            return cls.from_bytes(data)
        except Exception as exc:  # noqa: BLE001 - one line naming the file, whatever broke
            first = " ".join(str(exc).split())[:200]
            raise UnsafeFile(f"tokenizer: {url} is not a codebook file ({first})") from None


def read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file: 8-byte little-endian header size, JSON."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__") or {}


def load_codebook(
    url: str, num_tokens: int, patch_dim: int, storage_options: dict[str, Any] | None = None
) -> torch.Tensor:
    """The (V, P) codebook at ``url``, checked against the model's ``num_tokens`` and P."""
    tok = Tokenizer.load(url, storage_options)
    if (tok.num_tokens, tok.patch_dim) != (num_tokens, patch_dim):
        raise ValueError(
            f"tokenizer: codebook at {url!r} has {tok.num_tokens} tokens of {tok.patch_dim} "
            f"values; the model needs num_tokens={num_tokens}, patch_dim={patch_dim}"
        )
    return tok.codebook


def fit_tokenizer_from_arrays(
    patches_uint8: np.ndarray | torch.Tensor,
    num_tokens: int = 512,
    iters: int = 20,
    seed: int = 0,
    eps: float = 1e-6,
) -> Tokenizer:
    """Fit a codebook on uint8 patches (in memory).

    Args:
        patches_uint8: (N, P) or (B, K, P) uint8 patches.
        num_tokens: V, the codebook size.
        iters: Maximum Lloyd iterations.
        seed: k-means++ seed.
        eps: Normalization epsilon (the model's ``target_eps``).

    Returns:
        The :class:`Tokenizer`; ``fitted_on`` holds the counts, the seed, the iterations
        allowed and run, and the final inertia (mean squared distance to the nearest centroid).
    """
    x = patch_vectors(patches_uint8, eps)  # (N, P)
    result = kmeans(x, num_tokens, iters, seed)
    info = {
        "patches": int(x.shape[0]),
        "seed": seed,
        "iters": iters,
        "iterations": result.iterations,
        "inertia": result.inertia,
    }
    return Tokenizer(result.centroids, eps, info)

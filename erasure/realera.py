"""RealEra (arXiv 2410.09140): neighbor-concept mining + beyond-concept preservation, closed-form stage.

Algorithm:

1. the UCE rows: concept tokens ``e`` mapped to the guide (settings as in :mod:`erasure.uce`);
2. neighbor mining: around every edited row ``e`` sample ``n_neighbors`` perturbed embeddings ``e + eta``
   inside the band ``cos(e, e + eta) in [s1, s2]`` and ``||eta|| <= d1 ||e||``; they are erased too
   (same guide target), so paraphrases and associated concepts that land near ``e`` go with it;
3. beyond-concept preservation: ``n_beyond`` embeddings per row sampled further out,
   ``cos in [beyond_s1, beyond_s2]``, keep their original K/V outputs;
4. one solve (:func:`conceptsmith.linalg.solve_ridge`) for every K and V projection.

Sampling (no official code or published values exist, so this is our choice): perturbations keep the
norm of ``e`` (CLIP's final layer norm makes token-state norms nearly constant), so
``e' = ||e|| (s e/||e|| + sqrt(1 - s^2) u)`` with ``u`` a random unit vector orthogonal to ``e`` and the
cosine ``s`` uniform in the band. The distance is then ``||e' - e|| = ||e|| sqrt(2 (1 - s))``, so the
bound ``d1`` (relative to ``||e||``) caps the band at ``s >= 1 - d1^2 / 2``. Defaults: ``s1 = 0.85``,
``s2 = 0.97``, ``d1 = 0.5`` (cos >= 0.875), 8 neighbors; beyond band ``[0.5, 0.75]``, 8 samples.
The RealEra LoRA stage (noise alignment) is training-based and not part of this editor.

Every token policy works: with ``all`` (concept word through the padding) every edited row gets its
neighbours and beyond-concept samples, i.e. thousands of rows for a 77-token prompt and its templates.
Their weights then decide everything: on ShapesWorld (128-dim text states) the defaults swamped the edit
(triangle still drawn in every image), while a band inside the gap between concepts (two shapes' padding
states have cosine ~0.98: ``s1 = 0.99``, ``s2 = 0.998``, ``d1 = 0.15``) with ``neighbor_scale = 0.25`` and
``beyond_scale = 0.005`` erased it (``configs/bench/shapes-objects.yaml``).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from pydantic import Field, model_validator

from conceptsmith.edits import Edit
from conceptsmith.erasure._closed_form import (
    check_request,
    kv_weights,
    make_edit,
    solve,
    torch_dtype,
)
from conceptsmith.erasure.uce import UCEConfig, default_guide, request_rows
from conceptsmith.registry import UNET_FAMILIES, Editor, EditRequest, register_editor


class RealEraConfig(UCEConfig):
    """Defaults mirror ``configs/erase/realera.yaml``."""

    n_neighbors: int = Field(8, ge=0, description="perturbed neighbors erased per edited token")
    d1: float = Field(0.5, gt=0, description="distance bound ||eta|| <= d1 ||e|| of a neighbor")
    s1: float = Field(0.85, gt=-1, lt=1, description="lowest cosine of a neighbor")
    s2: float = Field(0.97, gt=-1, lt=1, description="highest cosine of a neighbor")
    neighbor_scale: float = Field(1.0, ge=0, description="weight of a neighbor relative to erase_scale")
    n_beyond: int = Field(8, ge=0, description="beyond-concept samples preserved per edited token")
    beyond_s1: float = Field(0.5, gt=-1, lt=1, description="lowest cosine of a beyond-concept sample")
    beyond_s2: float = Field(0.75, gt=-1, lt=1, description="highest cosine of a beyond-concept sample")
    beyond_scale: float = Field(1.0, ge=0, description="weight of a beyond-concept sample")

    @model_validator(mode="after")
    def _bands(self) -> RealEraConfig:
        if not self.s1 <= self.s2:
            raise ValueError(f"s1 ({self.s1}) must be <= s2 ({self.s2})")
        if not self.beyond_s1 <= self.beyond_s2:
            raise ValueError(f"beyond_s1 ({self.beyond_s1}) must be <= beyond_s2 ({self.beyond_s2})")
        if max(self.s1, 1 - self.d1**2 / 2) > self.s2:
            raise ValueError(f"d1 = {self.d1} allows only cosines >= {1 - self.d1**2 / 2:.3f}, above s2 = {self.s2}: raise d1 or s2")
        return self


def sample_band(rows: torch.Tensor, n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` norm-preserving samples per row (``[rows * n, d]``, grouped by row) with cosine to the row in ``[low, high]``."""
    rows = rows.double()
    k, d = rows.shape
    if n == 0 or k == 0:
        return rows.new_zeros(0, d)
    norms = rows.norm(dim=1, keepdim=True)
    unit = rows / norms.clamp_min(1e-12)
    u = torch.randn(k, n, d, generator=generator, dtype=torch.float64)
    u = u - (u @ unit[:, :, None]) * unit[:, None, :]  # orthogonal to the row
    u = u / u.norm(dim=2, keepdim=True).clamp_min(1e-12)
    s = low + (high - low) * torch.rand(k, n, 1, generator=generator, dtype=torch.float64)
    samples = norms[:, None, :] * (s * unit[:, None, :] + (1 - s**2).clamp_min(0).sqrt() * u)
    return samples.reshape(k * n, d)


@register_editor("realera", description="RealEra: UCE plus erased neighbor embeddings and preserved beyond-concept ones")
class RealEra(Editor):
    Config = RealEraConfig
    supports = UNET_FAMILIES

    def fit(self, pipe: Any, request: EditRequest) -> Edit:
        config: RealEraConfig = self.config
        started = time.perf_counter()
        checked = check_request(pipe, request, default_guide(config.concept_type))
        rows, _ = request_rows(pipe, checked, config, config.preserve_cache())

        generator = torch.Generator().manual_seed(request.seed)
        low = max(config.s1, 1 - config.d1**2 / 2)
        neighbors = sample_band(rows.inputs, config.n_neighbors, low, config.s2, generator)
        beyond = sample_band(rows.inputs, config.n_beyond, config.beyond_s1, config.beyond_s2, generator)
        k = rows.inputs.shape[0]
        inputs = torch.cat([rows.inputs.double(), neighbors])
        targets = torch.cat([rows.targets.double(), rows.targets.double().repeat_interleave(config.n_neighbors, dim=0)])
        edit_weights = torch.cat([
            torch.full((k,), config.erase_scale, dtype=torch.float64),
            torch.full((neighbors.shape[0],), config.erase_scale * config.neighbor_scale, dtype=torch.float64),
        ])
        preserve_parts = [p for p in (rows.preserve, beyond) if p is not None and p.shape[0] > 0]
        preserve_weights = torch.cat(
            ([torch.full((rows.preserve.shape[0],), config.preserve_scale, dtype=torch.float64)] if rows.preserve is not None else [])
            + [torch.full((beyond.shape[0],), config.beyond_scale, dtype=torch.float64)]
        )
        preserve = torch.cat([p.double() for p in preserve_parts]) if preserve_parts else None
        encoded = time.perf_counter()
        solution = solve(
            kv_weights(pipe),
            inputs,
            targets,
            edit_weights=edit_weights,
            preserve_inputs=preserve,
            preserve_weights=preserve_weights if preserve is not None else 1.0,
            lam=config.lam,
            dtype=torch_dtype(config.solve_dtype),
        )
        params = {**config.model_dump(), "guide": checked.guide, "preserve": checked.preserve, "seed": request.seed}
        metadata = {
            "closed_form": solution.metrics(),
            "mining": {
                "edited_tokens": k,
                "neighbors": int(neighbors.shape[0]),
                "beyond": int(beyond.shape[0]),
                "neighbor_cosine_band": [low, config.s2],
                "max_neighbor_distance_rel": math.sqrt(2 * (1 - low)),
            },
            "timing_s": {"encode_and_sample": encoded - started, "solve": time.perf_counter() - encoded},
        }
        return make_edit(pipe, self.name, checked.concepts, params, solution.deltas, metadata)

"""MACE closed-form refinement (Lu et al., CVPR 2024), the closed-form stage of Mass Concept Erasure.

Algorithm:

1. put each concept into ``n_prompts`` templates and make the same prompts with the concept replaced
   by the mapping concept (the guide: ``''`` for objects, ``'art'`` for styles unless given);
2. match the SURROUNDING tokens of each pair: the common prefix, the common suffix (EOS included)
   and the padding after it, aligned from the end; each surrounding token of the concept prompt is
   an edit vector whose target is the matched token's K/V output in the mapping prompt (concept
   information leaks into later tokens through the causal text encoder; this removes it);
3. preserve a prior over a caption corpus, ``sum c c^T`` over every token of every caption, built once
   per base model and caption corpus and cached as safetensors under ``cache_dir`` (keyed by the
   base-model fingerprint and a hash of the corpus; ``sum W c c^T = W sum c c^T`` needs no storage);
   it enters as ``prior_weight`` captions' worth of tokens (the mean per-caption Gram times
   ``prior_weight``); captions that name an erased concept are subtracted from it first
   (``exclude_concept_captions``: in a corpus full of the concept, as ShapesWorld's, the prior would
   otherwise preserve exactly what is erased); preserved concepts keep all their tokens' outputs;
4. one solve for every K and V, anchored at the current weights with ``lam``.

MACE then trains one rank-1 LoRA per concept on the concept tokens' attention maps and fuses them
in closed form (training; not part of this editor). Until that stage exists, ``edit_concept_tokens``
(default on) also maps the concept's own tokens to the mapping concept's last token, UCE-style, so
that this editor erases on its own; set it off for MACE's CFR exactly.

Caption corpus: ``corpus_file`` (a text file, one caption per line, e.g. COCO captions for real
models), else ``corpus_size`` ShapesWorld captions from :mod:`conceptsmith.world` (a generator that
needs no download; right for ``builtin:shapes``, only a weak prior for real checkpoints).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from safetensors import safe_open

from conceptsmith.edits import Edit, EditError, base_fingerprint
from conceptsmith.erasure._closed_form import (
    ClosedFormConfig,
    cache_root,
    check_request,
    guide_rows,
    kv_weights,
    make_edit,
    solve,
    torch_dtype,
)
from conceptsmith.erasure.uce import default_guide
from conceptsmith.io import save_safetensors
from conceptsmith.registry import UNET_FAMILIES, Editor, EditRequest, register_editor
from conceptsmith.text import encode_prompts, tokenize
from conceptsmith.token_positions import concept_token_embeddings
from conceptsmith.world.render import make_caption, sample_labels

OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of {}", "{} in a photo", "a close-up picture of {}", "an image showing {}", "a drawing of {}",
    "{} drawn in pencil", "a painting of {}", "a watercolor of {}", "a digital illustration of {}",
    "{} on a plain background", "a sketch of {}", "a cartoon of {}", "a 3d render of {}",
    "a black and white photo of {}", "{} seen from above", "a poster featuring {}", "a snapshot of {}",
    "{} in bright light", "a detailed picture of {}", "an icon of {}", "a blurry photo of {}",
    "{} next to a window", "a print of {}", "a mural of {}", "{} in a magazine", "a large picture of {}",
    "{}, high quality", "an old photograph of {}", "a clean vector image of {}", "{} at night",
)
STYLE_TEMPLATES: tuple[str, ...] = (
    "a painting by {}", "an artwork by {}", "art in the style of {}", "a drawing by {}", "a landscape by {}",
    "a portrait by {}", "{} style painting", "a sketch by {}", "a still life by {}", "a city scene painted by {}",
    "an illustration by {}", "a print by {}", "a masterpiece by {}", "a mural in the manner of {}",
    "a poster designed by {}", "a famous work of {}", "a late work of {}", "an early work of {}",
    "a picture in the style of {}", "brush strokes like {}", "a canvas by {}", "a study by {}",
    "an abstract piece by {}", "a scene drawn by {}", "a seascape by {}", "a flower painting by {}",
    "a drawing inspired by {}", "{}, oil on canvas", "a museum piece by {}", "a digital painting after {}",
)


class MaceCFRConfig(ClosedFormConfig):
    """Defaults mirror ``configs/erase/mace-cfr.yaml``."""

    concept_type: Literal["object", "art"] = Field("object", description="templates and default mapping concept")
    n_prompts: int = Field(30, ge=1, le=30, description="template prompts per concept")
    edit_concept_tokens: bool = Field(True, description="also map the concept's own tokens (stand-in for MACE's LoRA stage)")
    preserve_scale: float = Field(1.0, ge=0, description="weight of every token of the request's preserved concepts")
    prior_weight: float = Field(100.0, ge=0, description="captions' worth of the cached prior (0 disables it)")
    corpus_file: str | None = Field(None, description="caption corpus, one caption per line (default: ShapesWorld captions)")
    corpus_size: int = Field(500, ge=1, description="generated ShapesWorld captions when there is no corpus_file")
    exclude_concept_captions: bool = Field(
        True, description="leave the captions that name an erased concept out of the prior (they would preserve it)"
    )


# -- the caption prior --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prior:
    """``gram = sum c c^T`` over every token of ``n_captions`` captions (float64), and where it is cached."""

    gram: torch.Tensor
    n_captions: int
    n_tokens: int
    path: Path | None
    from_cache: bool


def shapes_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` ShapesWorld training-style captions (labels sampled, nothing rendered)."""
    rng = np.random.default_rng(seed)
    return [make_caption(sample_labels(rng), rng) for _ in range(n)]


def read_corpus(path: str | Path) -> list[str]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise EditError(f"Caption corpus '{path}' does not exist; pass a text file with one caption per line.")
    captions = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not captions:
        raise EditError(f"Caption corpus '{path}' has no captions; put one caption per line.")
    return captions


def build_prior(pipe: Any, captions: list[str], batch_size: int = 64) -> tuple[torch.Tensor, int]:
    """``(sum c c^T, tokens)`` over every position (77 per caption, padding included) of ``captions``."""
    gram = None
    tokens = 0
    for start in range(0, len(captions), batch_size):
        states = encode_prompts(pipe, captions[start : start + batch_size]).double()
        rows = states.reshape(-1, states.shape[-1])
        gram = rows.T @ rows if gram is None else gram + rows.T @ rows
        tokens += rows.shape[0]
    return gram, tokens


def captions_mentioning(captions: list[str], concepts: list[str]) -> list[str]:
    """The captions that contain one of ``concepts`` as whole words (case and spacing ignored)."""
    patterns = [re.compile(r"\b" + r"\s+".join(map(re.escape, c.lower().split())) + r"\b") for c in concepts]
    return [caption for caption in captions if any(p.search(caption.lower()) for p in patterns)]


def load_or_build_prior(pipe: Any, captions: list[str], cache_dir: str | None) -> Prior:
    """The prior of ``captions`` for ``pipe``'s base model, from the cache or built once and stored there."""
    corpus_hash = hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]
    fingerprint = base_fingerprint(pipe)
    directory = cache_root(cache_dir) / "priors"
    path = directory / f"mace-prior-{fingerprint}-{corpus_hash}.safetensors"
    if path.is_file():
        with safe_open(str(path), framework="pt") as handle:
            info = json.loads((handle.metadata() or {}).get("conceptsmith_prior", "{}"))
            if info.get("fingerprint") == fingerprint and info.get("corpus_sha256_16") == corpus_hash:
                return Prior(handle.get_tensor("gram"), info["n_captions"], info["n_tokens"], path, True)
    gram, tokens = build_prior(pipe, captions)
    info = {"fingerprint": fingerprint, "corpus_sha256_16": corpus_hash, "n_captions": len(captions), "n_tokens": tokens}
    save_safetensors(path, {"gram": gram}, {"conceptsmith_prior": json.dumps(info)})
    return Prior(gram, len(captions), tokens, path, False)


# -- surrounding-token matching ----------------------------------------------------------------------


def match_surrounding(old_ids: list[int], new_ids: list[int], context: int) -> tuple[list[int], list[int]]:
    """Positions of the tokens two prompts share around the part that differs: common prefix, common
    suffix (EOS included) and the padding after it, aligned from the end (``*_ids``: real tokens only)."""
    prefix = 0
    while prefix < min(len(old_ids), len(new_ids)) and old_ids[prefix] == new_ids[prefix]:
        prefix += 1
    suffix = 0
    while (
        suffix < min(len(old_ids), len(new_ids)) - prefix
        and old_ids[len(old_ids) - 1 - suffix] == new_ids[len(new_ids) - 1 - suffix]
    ):
        suffix += 1
    offset = len(new_ids) - len(old_ids)
    old = list(range(prefix)) + list(range(len(old_ids) - suffix, len(old_ids)))
    old += [j for j in range(len(old_ids), context) if j + offset < context]
    new = list(range(prefix)) + [j + offset for j in old[prefix:]]
    return old, new


@register_editor("mace-cfr", description="MACE closed-form refinement: remove the concept from surrounding tokens")
class MaceCFR(Editor):
    Config = MaceCFRConfig
    supports = UNET_FAMILIES

    def fit(self, pipe: Any, request: EditRequest) -> Edit:
        config: MaceCFRConfig = self.config
        started = time.perf_counter()
        checked = check_request(pipe, request, default_guide(config.concept_type))
        templates = (STYLE_TEMPLATES if config.concept_type == "art" else OBJECT_TEMPLATES)[: config.n_prompts]
        prompts = [template.format(concept) for concept in checked.concepts for template in templates]
        phrases = [concept for concept in checked.concepts for _ in templates]
        mapped = [" ".join(template.format(checked.guide).split()) for _ in checked.concepts for template in templates]

        # surrounding tokens of each (concept prompt, mapping prompt) pair
        old_tok, new_tok = tokenize(pipe, prompts), tokenize(pipe, mapped, warn=False)
        old_states, new_states = encode_prompts(pipe, prompts), encode_prompts(pipe, mapped)
        context = old_states.shape[1]
        inputs, targets = [], []
        for i in range(len(prompts)):
            old_ids = old_tok.input_ids[i, : old_tok.lengths[i]].tolist()
            new_ids = new_tok.input_ids[i, : new_tok.lengths[i]].tolist()
            old_pos, new_pos = match_surrounding(old_ids, new_ids, context)
            inputs.append(old_states[i, old_pos])
            targets.append(new_states[i, new_pos])
        n_surrounding = sum(x.shape[0] for x in inputs)
        if config.edit_concept_tokens:
            concept_rows = concept_token_embeddings(pipe, prompts, phrases, "phrase")
            inputs.append(concept_rows)
            targets.append(guide_rows(pipe, checked.guide, "last_word")["word"].expand(concept_rows.shape[0], -1))
        preserve = encode_prompts(pipe, checked.preserve).reshape(-1, old_states.shape[-1]) if checked.preserve else None

        prior = None
        prior_gram = None
        excluded: list[str] = []
        if config.prior_weight > 0:
            captions = read_corpus(config.corpus_file) if config.corpus_file else shapes_captions(config.corpus_size)
            prior = load_or_build_prior(pipe, captions, config.cache_dir)
            gram = prior.gram
            if config.exclude_concept_captions:
                # the cached prior stays per corpus; the few captions naming the concept are subtracted
                excluded = captions_mentioning(captions, checked.concepts)
                if excluded:
                    gram = gram - build_prior(pipe, excluded)[0]
            prior_gram = gram * (config.prior_weight / max(1, prior.n_captions - len(excluded)))
        encoded = time.perf_counter()
        solution = solve(
            kv_weights(pipe),
            torch.cat(inputs),
            torch.cat(targets),
            preserve_inputs=preserve,
            preserve_weights=config.preserve_scale,
            preserve_gram=prior_gram,
            lam=config.lam,
            dtype=torch_dtype(config.solve_dtype),
        )
        params = {**config.model_dump(), "guide": checked.guide, "preserve": checked.preserve}
        metadata = {
            "closed_form": solution.metrics(),
            "refinement": {"prompts": len(prompts), "surrounding_tokens": n_surrounding},
            "timing_s": {"encode": encoded - started, "solve": time.perf_counter() - encoded},
        }
        if prior is not None:
            metadata["prior"] = {
                "captions": prior.n_captions,
                "tokens": prior.n_tokens,
                "cache": str(prior.path) if prior.path else None,
                "from_cache": prior.from_cache,
                "excluded_captions": len(excluded),
            }
        return make_edit(pipe, self.name, checked.concepts, params, solution.deltas, metadata)

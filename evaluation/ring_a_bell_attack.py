"""Ring-A-Bell-style concept-vector attack (Tsai et al. 2024, "Ring-A-Bell! How Reliable are Concept
Removal Methods for Diffusion Models?").

``v = mean_i [emb(with_i) - emb(without_i)]`` over prompt pairs (full ``[77, d]`` conditioning), attack
embedding ``emb(prompt) + eta v``; optionally a discrete prompt whose embedding is close to it, found
by :func:`greedy_prompt_search`. That search is *not* Ring-A-Bell's genetic algorithm: it is a greedy
coordinate search over whole-word CLIP tokens -- sweep the positions, at each try ``n_candidates``
random vocabulary words plus the current one, keep the word minimizing ``||emb(prompt) - target||^2``
-- gradient-free, monotone, seeded.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from conceptsmith.text import encode_prompts, text_encoders

__all__ = [
    "PromptSearch",
    "RingABellAttack",
    "concept_vector",
    "greedy_prompt_search",
    "ring_a_bell",
    "sdxl_pooled",
    "whole_word_vocabulary",
]


def sdxl_pooled(pipe: Any, prompts: list[str]) -> torch.Tensor | None:
    """SDXL's pooled text embeddings (the UNet's extra conditioning), None for SD 1.x / 2.x."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return None
    with torch.no_grad():
        out = pipe.encode_prompt(prompts, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return out[2]


def concept_vector(pipe: Any, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
    """``mean_i [emb(with_i) - emb(without_i)]`` over prompt pairs, ``[L, d]`` (full conditioning)."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("concept_vector needs at least one (with concept, without concept) prompt pair")
    emb = encode_prompts(pipe, [p for pair in pairs for p in pair])
    emb = emb.view(len(pairs), 2, *emb.shape[1:])
    return (emb[:, 0] - emb[:, 1]).mean(dim=0)


@dataclass(frozen=True)
class PromptSearch:
    """Result of :func:`greedy_prompt_search`: the prompt, its squared distance to the target and the
    distance after each sweep (``history[0]`` is the initial prompt's)."""

    prompt: str
    words: tuple[str, ...]
    distance: float
    history: tuple[float, ...]


def whole_word_vocabulary(tokenizer: Any) -> list[str]:
    """Whole-word, alphabetic CLIP tokens (``word</w>``) of two letters or more."""
    vocab = tokenizer.get_vocab()
    words = sorted(
        {t[:-4] for t in vocab if t.endswith("</w>") and t[:-4].isalpha() and t[:-4].isascii() and len(t) > 5}
    )
    return words


def greedy_prompt_search(
    pipe: Any,
    target: torch.Tensor,
    *,
    n_words: int = 16,
    sweeps: int = 2,
    n_candidates: int = 64,
    init: str | Sequence[str] | None = None,
    vocabulary: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 64,
) -> PromptSearch:
    """Greedy coordinate search for a prompt of ``n_words`` words whose conditioning ``[L, d]`` is
    closest (squared L2 over all positions) to ``target``.

    Each sweep visits every word position; at each it evaluates the current word and
    ``n_candidates`` words drawn (seeded) from ``vocabulary`` (default: the tokenizer's whole-word
    alphabetic tokens) and keeps the best. The distance never increases. ``init`` gives the starting
    words (padded with random words / truncated to ``n_words``).
    """
    rng = random.Random(seed)
    vocab = list(vocabulary) if vocabulary is not None else whole_word_vocabulary(text_encoders(pipe)[0][0])
    if not vocab:
        raise ValueError("empty vocabulary for the prompt search")
    words = (init.split() if isinstance(init, str) else list(init or []))[:n_words]
    words += [rng.choice(vocab) for _ in range(n_words - len(words))]
    target = target.detach().float()

    def distances(prompts: list[str]) -> torch.Tensor:
        emb = encode_prompts(pipe, prompts, batch_size=batch_size).to(target.device)
        return (emb - target).square().flatten(1).sum(-1)

    best = float(distances([" ".join(words)])[0])
    history = [best]
    for _ in range(sweeps):
        for pos in range(n_words):
            cands = list(dict.fromkeys([words[pos], *rng.sample(vocab, min(n_candidates, len(vocab)))]))
            prompts = [" ".join(words[:pos] + [w] + words[pos + 1 :]) for w in cands]
            dist = distances(prompts)
            i = int(dist.argmin())
            if float(dist[i]) < best:
                best, words[pos] = float(dist[i]), cands[i]
        history.append(best)
    return PromptSearch(" ".join(words), tuple(words), best, tuple(history))


@dataclass
class RingABellAttack:
    """Continuous attack conditioning ``prompt_embeds`` = emb(prompt) + eta * vector, and (with a
    search) the discrete prompts found for each."""

    prompts: list[str]
    eta: float
    vector: torch.Tensor
    prompt_embeds: torch.Tensor
    searches: list[PromptSearch] = field(default_factory=list)
    pooled_prompt_embeds: torch.Tensor | None = None  # SDXL: pooled embeddings of the prompts

    @property
    def attack_prompts(self) -> list[str]:
        return [s.prompt for s in self.searches]

    def pipeline_kwargs(self, index: int | None = None) -> dict[str, torch.Tensor]:
        sl = slice(None) if index is None else slice(index, index + 1)
        kw = {"prompt_embeds": self.prompt_embeds[sl]}
        if self.pooled_prompt_embeds is not None:
            kw["pooled_prompt_embeds"] = self.pooled_prompt_embeds[sl]
        return kw


def ring_a_bell(
    pipe: Any,
    prompts: Sequence[str],
    pairs: Sequence[tuple[str, str]],
    *,
    eta: float = 3.0,
    search: bool = False,
    **search_kwargs: Any,
) -> RingABellAttack:
    """Ring-A-Bell-style attack: concept vector from ``pairs`` (computed with ``pipe``'s text encoder,
    which a UNet-only erasure leaves intact), added with strength ``eta`` (paper: 3 nudity, 0.9 Van
    Gogh) to each prompt's conditioning. ``search=True`` also runs :func:`greedy_prompt_search` per
    prompt (starting from the prompt's own words) for a discrete prompt near the attack embedding."""
    prompts = list(prompts)
    vector = concept_vector(pipe, pairs)
    embeds = encode_prompts(pipe, prompts) + eta * vector
    searches = []
    if search:
        for i, p in enumerate(prompts):
            kw = {"init": p, **search_kwargs}
            searches.append(greedy_prompt_search(pipe, embeds[i], **kw))
    return RingABellAttack(prompts, float(eta), vector, embeds, searches, sdxl_pooled(pipe, prompts))

"""Textual inversion, and the installation of new tokens that every customization method shares.

New tokens live in an Edit as a ``custom-tokens`` hook edit (the format: :mod:`conceptsmith.tokens`).
``edit.apply(pipe)`` installs them: the pipe's tokenizer is replaced by a copy with the tokens added
(a token with n vectors becomes ``<t> <t>_1 ... <t>_{n-1}``, the diffusers convention, so the
pipelines expand it in prompts by themselves) and each text encoder's input embedding by an
:class:`ExtendedEmbedding` (the original table, untouched, plus the new rows). ``revert`` puts the
original tokenizer and embedding module back (bit-exact). Custom Diffusion and LoRA with a learned
token return a ``composite`` edit whose parts are the weight change and this token edit.

:func:`export_embeddings` writes the tokens in the format of diffusers' ``load_textual_inversion``.

Textual inversion itself (``textual-inversion`` editor): learn ``num_vectors`` vectors per concept
with the denoising loss on the reference images, everything else frozen.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from conceptsmith.customization import CustomizationError
from conceptsmith.customization.data import (
    CutMixOptions,
    ZoomOutOptions,
    concept_specs,
    default_resolution,
    instance_examples,
)
from conceptsmith.diffusion import DenoisingObjective, TextConditioner, expand_multi_vector, noise_scheduler
from conceptsmith.edits import Edit, EditError
from conceptsmith.io import save_safetensors
from conceptsmith.registry import UNET_FAMILIES, Editor, EditRequest, register_editor, register_hook
from conceptsmith.tokens import (
    TOKEN_HOOK,
    TOKENIZER_OF,
    check_new_tokens,
    components,
    token_edit,
    token_entries,
    token_parts,
)
from conceptsmith.trainable import frozen, pipe_components, shared_copy
from conceptsmith.training import TrainingConfig, train


def token_names(token: str, num_vectors: int) -> list[str]:
    """The tokenizer entries of a token with ``num_vectors`` vectors: ``<t>, <t>_1, ..., <t>_{n-1}``."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


class ExtendedEmbedding(nn.Module):
    """A token-embedding table plus extra rows for ids ``>= base.num_embeddings``; the base is not copied."""

    def __init__(self, base: nn.Module, rows: torch.Tensor, trainable: bool = False) -> None:
        super().__init__()
        self.base = base
        if trainable:
            self.rows = rows if isinstance(rows, nn.Parameter) else nn.Parameter(rows)
        else:
            self.register_buffer("rows", rows.detach().clone())
        self.base_size = int(base.num_embeddings)
        self.num_embeddings = self.base_size + rows.shape[0]
        self.embedding_dim = int(rows.shape[1])

    @property
    def weight(self) -> torch.Tensor:
        """The whole table (a concatenated copy, for code that reads ``.weight``)."""
        return torch.cat([self.base.weight, self.rows.to(self.base.weight.dtype)])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.base_size
        out = self.base(input_ids.clamp(max=self.base_size - 1))
        if not bool(is_new.any()):
            return out
        new = self.rows[(input_ids - self.base_size).clamp(min=0)].to(out.dtype)
        return torch.where(is_new[..., None], new, out)


def _add(tokenizer: Any, encoder: nn.Module, entries: Sequence[tuple[str, torch.Tensor]], what: str) -> tuple[Any, int]:
    """A tokenizer copy with ``entries``' tokens added; checks that their ids follow the embedding table."""
    new_tokenizer = copy.deepcopy(tokenizer)
    names = [name for token, rows in entries for name in token_names(token, rows.shape[0])]
    existing = [n for n in names if n in new_tokenizer.get_vocab()]
    if existing:
        raise EditError(f"Cannot add {what}: token(s) {existing} already exist in this pipe's tokenizer (is an edit with them already applied?).")
    table = encoder.get_input_embeddings()
    start = int(table.num_embeddings)
    if len(new_tokenizer) != start:
        raise EditError(
            f"Cannot add {what}: the tokenizer has {len(new_tokenizer)} entries but the text encoder's embedding table "
            f"{start} rows; new token ids would not match their vectors."
        )
    new_tokenizer.add_tokens(names)
    ids = new_tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(start, start + len(names))):
        raise EditError(f"Cannot add {what}: the tokenizer gave ids {ids}, expected {start}..{start + len(names) - 1}.")
    return new_tokenizer, start


def init_vectors(tokenizer: Any, encoder: nn.Module, word: str | None, num_vectors: int, generator: torch.Generator) -> torch.Tensor:
    """``[num_vectors, d]`` float32: the mean embedding of ``word``'s tokens (random, table-scaled, if None)."""
    table = encoder.get_input_embeddings().weight.detach()
    if word:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise CustomizationError(f"Initializer word {word!r} has no tokens.")
        vector = table[ids].float().mean(0)
    else:
        vector = torch.randn(table.shape[1], generator=generator) * table.float().std()
    return vector.to(table.device).expand(num_vectors, -1).clone()


class NewTokens:
    """Trainable new tokens in copies of a pipe's tokenizers and text encoders (the pipe is untouched).

    ``conditioner(size)`` encodes prompts with them (differentiable); ``parameters()`` are the new rows;
    ``edit(...)`` turns the learned vectors into a ``custom-tokens`` hook edit.
    """

    def __init__(self, pipe: object, tokens: Sequence[str], init_words: Sequence[str | None], num_vectors: int = 1, seed: int = 0):
        check_new_tokens(pipe, tokens)
        self.tokens = list(tokens)
        self.num_vectors = int(num_vectors)
        self.components = components(pipe)
        self.pairs: list[tuple[Any, nn.Module]] = []
        self.rows: dict[str, nn.Parameter] = {}
        self.pipe_family_dual = getattr(pipe, "text_encoder_2", None) is not None
        generator = torch.Generator().manual_seed(seed)
        for component in self.components:
            tokenizer = getattr(pipe, TOKENIZER_OF[component])
            encoder = getattr(pipe, component)
            init = torch.cat([init_vectors(tokenizer, encoder, w, self.num_vectors, generator) for w in init_words])
            entries = [(t, init[i * self.num_vectors : (i + 1) * self.num_vectors]) for i, t in enumerate(self.tokens)]
            new_tokenizer, _ = _add(tokenizer, encoder, entries, f"tokens {self.tokens}")
            copy_ = shared_copy(encoder)
            rows = nn.Parameter(init.float())
            copy_.set_input_embeddings(ExtendedEmbedding(copy_.get_input_embeddings(), rows, trainable=True))
            self.pairs.append((new_tokenizer, copy_))
            self.rows[component] = rows

    def parameters(self) -> dict[str, nn.Parameter]:
        return {f"{component}.new_tokens": rows for component, rows in self.rows.items()}

    @property
    def encoders(self) -> list[nn.Module]:
        return [encoder for _, encoder in self.pairs]

    def conditioner(self, size: int) -> TextConditioner:
        return TextConditioner(self.pairs, dual=self.pipe_family_dual, size=size)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for component, rows in self.rows.items():
            for i, token in enumerate(self.tokens):
                out[f"{component}.{token}"] = rows.detach()[i * self.num_vectors : (i + 1) * self.num_vectors].float().cpu().clone()
        return out

    def edit(self, pipe: object, method: str, concepts: list[str], params: dict[str, Any], metadata: dict[str, Any] | None = None) -> Edit:
        return token_edit(pipe, method, concepts, params, self.tensors(), metadata)


class _TokenHandle:
    def __init__(self, pipe: object, restore: list[tuple[str, Any, nn.Module, nn.Module]]):
        self.pipe = pipe
        self.restore = restore

    def remove(self) -> None:
        for tokenizer_attr, tokenizer, encoder, embedding in reversed(self.restore):
            setattr(self.pipe, tokenizer_attr, tokenizer)
            encoder.set_input_embeddings(embedding)
        self.restore = []


@register_hook(TOKEN_HOOK, "new token embeddings: textual inversion, Custom Diffusion modifier tokens, pivotal LoRA tokens")
def install_tokens(edit: Edit, pipe: object) -> _TokenHandle:
    """Add the edit's tokens to ``pipe`` (tokenizer copy + extended embedding); ``remove()`` restores both."""
    entries = token_entries(edit)
    present = components(pipe)
    missing = [c for c in present if c not in entries]
    unknown = [c for c in entries if c not in present]
    if missing or unknown:
        raise EditError(
            f"The {edit.method} token edit has vectors for {sorted(entries)} but this pipe's text encoders are {present}: "
            "it was made for another model family."
        )
    restore = []
    try:
        for component, items in entries.items():
            encoder = getattr(pipe, component)
            tokenizer_attr = TOKENIZER_OF[component]
            old_tokenizer = getattr(pipe, tokenizer_attr)
            old_embedding = encoder.get_input_embeddings()
            dim = int(old_embedding.embedding_dim)
            bad = [t for t, rows in items if rows.shape[1] != dim]
            if bad:
                raise EditError(f"Token vectors of {bad} have width {items[0][1].shape[1]}, but {component} embeds tokens in {dim} dims.")
            new_tokenizer, _ = _add(old_tokenizer, encoder, items, f"the tokens of the {edit.method} edit")
            weight = old_embedding.weight
            rows = torch.cat([r for _, r in items]).to(weight.device, weight.dtype)
            setattr(pipe, tokenizer_attr, new_tokenizer)
            encoder.set_input_embeddings(ExtendedEmbedding(old_embedding, rows))
            restore.append((tokenizer_attr, old_tokenizer, encoder, old_embedding))
    except BaseException:
        _TokenHandle(pipe, restore).remove()
        raise
    return _TokenHandle(pipe, restore)


def export_embeddings(edit: Edit, folder: str | Path) -> list[Path]:
    """Write each token of ``edit`` (or of its token parts) for diffusers' ``load_textual_inversion``.

    SD 1.x/2.x: ``<folder>/<name>.safetensors`` holding ``{token: [n, d]}`` ->
    ``pipe.load_textual_inversion(path)``. SDXL: ``{"clip_l": ..., "clip_g": ...}`` ->
    ``pipe.load_textual_inversion(sd["clip_l"], token=t, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)``
    and the same with ``clip_g`` / ``text_encoder_2`` / ``tokenizer_2``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = token_parts(edit)
    if not parts:
        raise EditError(f"The '{edit.method}' edit holds no learned tokens to export.")
    written = []
    for part in parts:
        entries = token_entries(part)
        for index, (token, _) in enumerate(entries["text_encoder"]):
            name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in token).strip("_") or f"token{index}"
            path = folder / f"{name}.safetensors"
            if "text_encoder_2" in entries:
                tensors = {"clip_l": entries["text_encoder"][index][1], "clip_g": entries["text_encoder_2"][index][1]}
            else:
                tensors = {token: entries["text_encoder"][index][1]}
            save_safetensors(path, {k: v.float() for k, v in tensors.items()}, {"format": "pt", "token": token})
            written.append(path)
    return written


# -- the textual-inversion editor ----------------------------------------------------------------------


class TextualInversionConfig(TrainingConfig, ZoomOutOptions, CutMixOptions):
    """Defaults mirror ``configs/customize/textual-inversion.yaml``."""

    steps: int = Field(500, ge=1)
    learning_rate: float = Field(5e-3, gt=0)
    batch_size: int = Field(4, ge=1)
    num_vectors: int = Field(1, ge=1, le=16, description="vectors per concept token")
    init_word: str | None = Field(None, description="initial vectors: this word's embedding (default: the class word)")
    phrase: str = Field("{token}", description="how the concept appears in prompts ({token}, {class_word})")
    templates: Literal["object", "style"] | list[str] = "object"
    flip: bool = Field(True, description="also train on horizontally mirrored images")
    resolution: int | None = Field(None, description="training size (default: the pipeline's generation size)")


@register_editor("textual-inversion", description="Textual inversion: learn new token vector(s) per concept, model frozen")
class TextualInversion(Editor):
    Config = TextualInversionConfig
    supports = UNET_FAMILIES

    def fit(self, pipe: Any, request: EditRequest) -> Edit:
        config: TextualInversionConfig = self.config
        specs = concept_specs(request, phrase_format=config.phrase, need_class_word=False, method="Textual inversion")
        size = config.resolution or default_resolution(pipe)
        with frozen(*pipe_components(pipe)):
            tokens = NewTokens(pipe, [s.token for s in specs], [config.init_word or s.class_word for s in specs], config.num_vectors, request.seed)
            instances, _ = instance_examples(pipe, specs, config, size, request.seed)
            unet = shared_copy(pipe.unet)
            objective = DenoisingObjective(unet, noise_scheduler(pipe), tokens.conditioner(size), instances, None, config.batch_size)
            result = train(
                tokens.parameters(),
                objective,
                config,
                seed=request.seed,
                evaluate=objective.evaluate,
                models=[unet, *tokens.encoders],
                run_key=f"textual-inversion:{[s.token for s in specs]}:{[s.source for s in specs]}",
                description="textual inversion",
            )
        concepts = list(request.concepts) or [s.phrase for s in specs]
        params = {**config.model_dump(), "class_words": [s.class_word for s in specs], "phrases": [s.phrase for s in specs]}
        metadata = {"training": result.summary(), "losses": result.losses, "images": [s.source for s in specs]}
        return tokens.edit(pipe, "textual-inversion", concepts, params, metadata)


def tokens_view(pipe: object, token_edits: list[Edit]) -> Any:
    """A pipe-like object (tokenizers + text encoders) with the tokens of ``token_edits`` installed.

    ``pipe`` is untouched: tokenizers are copies, text encoders :func:`shared_copy` copies whose
    embedding is extended. Works with :func:`conceptsmith.text.encode_prompts` (multi-vector tokens
    are expanded in prompts as the pipelines do).
    """
    view = SimpleNamespace()
    for component in components(pipe):
        tokenizer_attr = TOKENIZER_OF[component]
        tokenizer, encoder = getattr(pipe, tokenizer_attr), getattr(pipe, component)
        items = [item for edit in token_edits for item in token_entries(edit).get(component, [])]
        if items:
            tokenizer, _ = _add(tokenizer, encoder, items, "the tokens of the merged edits")
            encoder = shared_copy(encoder)
            table = encoder.get_input_embeddings()
            rows = torch.cat([r for _, r in items]).to(table.weight.device, table.weight.dtype)
            encoder.set_input_embeddings(ExtendedEmbedding(table, rows))
        setattr(view, tokenizer_attr, tokenizer)
        setattr(view, component, encoder)

    def maybe_convert_prompt(prompts: Any, tokenizer: Any) -> Any:
        if isinstance(prompts, str):
            return expand_multi_vector(prompts, tokenizer)
        return [expand_multi_vector(p, tokenizer) for p in prompts]

    view.maybe_convert_prompt = maybe_convert_prompt
    return view

"""New tokens in an Edit: the ``custom-tokens`` hook edit that textual inversion, Custom Diffusion, LoRA with a
learned token and ``conceptsmith import`` of an embedding file all produce.

Its tensors are, per text encoder and token, the learned vectors::

    "<component>.<token>"  ->  [num_vectors, d]     (component: text_encoder / text_encoder_2)

and ``params["tokens"]`` keeps the tokens' order. Installing them in a pipe (the hook) lives with textual
inversion (:mod:`conceptsmith.customization.textual_inversion`); the LoRA / embedding file formats in
:mod:`conceptsmith.lora_formats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from conceptsmith.edits import Edit, EditError, base_fingerprint
from conceptsmith.errors import CustomizationError
from conceptsmith.models import detect_family

TOKEN_HOOK = "custom-tokens"
COMPONENTS = ("text_encoder", "text_encoder_2")
#: The tokenizer attribute of each text-encoder component.
TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


def components(pipe: object) -> list[str]:
    """Text-encoder components of ``pipe`` that have a tokenizer, in conditioning order."""
    found = [c for c in COMPONENTS if getattr(pipe, c, None) is not None and getattr(pipe, TOKENIZER_OF[c], None) is not None]
    if not found:
        raise CustomizationError(f"{type(pipe).__name__} has no tokenizer + text encoder to add tokens to.")
    return found


def check_new_tokens(pipe: object, tokens: Sequence[str]) -> None:
    """Raise a clear error for a token that is empty, has spaces, or already exists in a tokenizer of ``pipe``."""
    for token in tokens:
        if not isinstance(token, str) or not token.strip() or token != token.strip() or len(token.split()) != 1:
            raise CustomizationError(f"Token {token!r} must be one word without spaces, e.g. '<mascot>'.")
        for component in components(pipe):
            tokenizer = getattr(pipe, TOKENIZER_OF[component])
            if token in tokenizer.get_vocab() or token in getattr(tokenizer, "added_tokens_encoder", {}):
                raise CustomizationError(
                    f"Token {token!r} is already in the vocabulary of {TOKENIZER_OF[component]} (or was added by an "
                    "applied edit). Pick a new, unused token such as '<my-concept>'."
                )
            ids = tokenizer(token, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                raise CustomizationError(
                    f"Token {token!r} is already in the vocabulary of {TOKENIZER_OF[component]} (as the word "
                    f"{tokenizer.convert_ids_to_tokens(ids)[0]!r}); learning it would change that word everywhere. "
                    "Pick a new, unused token such as '<my-concept>'."
                )


def token_edit(
    pipe: object, method: str, concepts: list[str], params: dict[str, Any], tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None
) -> Edit:
    """A ``custom-tokens`` hook edit from ``{"<component>.<token>": [n, d]}`` tensors."""
    tokens = list(dict.fromkeys(key.partition(".")[2] for key in tensors))
    params = {**params, "tokens": tokens}
    return Edit.from_hook(method, concepts, params, base_fingerprint(pipe), detect_family(pipe), TOKEN_HOOK, tensors, metadata)


def token_entries(edit: Edit) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """Per component, the ``(token, vectors)`` of a ``custom-tokens`` edit, in the edit's token order."""
    if edit.hook != TOKEN_HOOK:
        raise EditError(f"The '{edit.method}' edit is not a token edit (hook {edit.hook!r}).")
    order = list(edit.params.get("tokens") or [])
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in edit.tensors.items():
        component, _, token = key.partition(".")
        if component not in COMPONENTS or not token:
            raise EditError(f"Unexpected tensor '{key}' in a token edit; expected '<text_encoder|text_encoder_2>.<token>'.")
        if value.ndim != 2:
            raise EditError(f"Token tensor '{key}' must be [num_vectors, d], got shape {list(value.shape)}.")
        grouped.setdefault(component, {})[token] = value
    result = {}
    for component, tokens in grouped.items():
        names = [t for t in order if t in tokens] + sorted(t for t in tokens if t not in order)
        result[component] = [(t, tokens[t]) for t in names]
    return result


def is_token_edit(edit: Edit) -> bool:
    """Whether ``edit`` itself is a ``custom-tokens`` edit."""
    return edit.kind == "hook" and edit.hook == TOKEN_HOOK


def token_parts(edit: Edit) -> list[Edit]:
    """The ``custom-tokens`` parts of an edit (the edit itself, or parts of a composite)."""
    return [part for part in (edit.parts or [edit]) if is_token_edit(part)]

"""Learned concept artifacts, loaded the way the augmenter and tests need them.

- Token embeddings: one safetensors file ``{token: tensor[num_vectors, dim] or tensor[dim]}``
  (diffusers' ``learned_embeds`` convention, what ``pipe.load_textual_inversion`` takes).
- Erasure weights: per-class UNet edits written by ``erase`` (see ``ErasureWeights``).
"""

from __future__ import annotations

from typing import Any, Optional

from . import storage
from .models import file_fingerprint

__all__ = [
    "EMBEDDINGS_FILE",
    "EmbeddingsError",
    "resolve_embeddings_uri",
    "load_embeddings",
    "add_tokens",
]

EMBEDDINGS_FILE = "tokens.safetensors"


class EmbeddingsError(ValueError):
    """A token embeddings file is missing, unreadable, or does not fit the model."""


def resolve_embeddings_uri(uri: str, endpoint_url: Optional[str] = None) -> str:
    """Accept the file itself or the `invert` output directory that holds it."""
    if uri.endswith(".safetensors"):
        return uri
    candidate = storage.join(uri, EMBEDDINGS_FILE)
    if storage.exists(candidate, endpoint_url):
        return candidate
    raise EmbeddingsError(
        f"no token embeddings at {uri}: expected a .safetensors file or a directory holding {EMBEDDINGS_FILE} "
        "(run `ray-dafusion invert` first)"
    )


def load_embeddings(uri: str, endpoint_url: Optional[str] = None) -> tuple[dict[str, Any], str]:
    """Read ``{token: tensor}`` and its fingerprint; every problem is an EmbeddingsError."""
    from safetensors.torch import load as load_safetensors

    path = resolve_embeddings_uri(uri, endpoint_url)
    try:
        data = storage.read_bytes(path, endpoint_url)
    except FileNotFoundError:
        raise EmbeddingsError(f"token embeddings file not found: {path}") from None
    try:
        tensors = load_safetensors(data)
    except Exception as exc:
        raise EmbeddingsError(f"token embeddings file {path} is not valid safetensors: {exc}") from None
    if not tensors:
        raise EmbeddingsError(f"token embeddings file {path} holds no tokens")
    for token, tensor in tensors.items():
        if tensor.ndim not in (1, 2) or not tensor.is_floating_point():
            raise EmbeddingsError(
                f"token {token!r} in {path} has shape {tuple(tensor.shape)} / {tensor.dtype}; "
                "expected a float tensor [dim] or [num_vectors, dim]"
            )
    return tensors, file_fingerprint(data)


def add_tokens(pipe: Any, embeddings: dict[str, Any]) -> None:
    """Add learned tokens to a pipeline's tokenizer and text encoder (diffusers' own loader)."""
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    for token, tensor in embeddings.items():
        if tensor.shape[-1] != dim:
            raise EmbeddingsError(
                f"token {token!r} has dimension {tensor.shape[-1]} but the model's text encoder uses {dim}: "
                "the embeddings were learned on another model"
            )
    tokens, vectors = [], []
    for token, tensor in embeddings.items():
        if token in pipe.tokenizer.get_vocab():
            continue  # already added (an actor reused for a second batch)
        rows = tensor if tensor.ndim == 2 else tensor[None]
        # multi-vector tokens follow diffusers' "<tok>", "<tok>_1", ... convention
        names = [token] + [f"{token}_{i}" for i in range(1, rows.shape[0])]
        tokens.extend(names)
        vectors.extend(rows)
    if tokens:
        pipe.load_textual_inversion(
            [v.detach() for v in vectors], token=tokens, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder
        )

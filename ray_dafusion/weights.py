"""Learned concept artifacts, loaded the way the augmenter and tests need them.

- Token embeddings: one safetensors file ``{token: tensor[num_vectors, dim] or tensor[dim]}``
  (diffusers' ``learned_embeds`` convention, what ``pipe.load_textual_inversion`` takes).
- Erasure weights: per-class UNet edits written by ``erase`` (see ``ErasureWeights``).
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

from . import storage
from .models import file_fingerprint
from .tokens import case_collision, taken_ignoring_case

__all__ = [
    "EMBEDDINGS_FILE",
    "EmbeddingsError",
    "resolve_embeddings_uri",
    "load_embeddings",
    "add_tokens",
    "ErasureWeights",
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
    clash = case_collision(sorted(tensors))  # sorted: safetensors keeps no order
    if clash:
        raise EmbeddingsError(f"tokens {clash[0]!r} and {clash[1]!r} in {path} differ only in case: CLIP's tokenizer "
                              "lowercases prompts, so both would read as one token")
    for token, tensor in tensors.items():
        if tensor.ndim not in (1, 2) or not tensor.is_floating_point():
            raise EmbeddingsError(
                f"token {token!r} in {path} has shape {tuple(tensor.shape)} / {tensor.dtype}; "
                "expected a float tensor [dim] or [num_vectors, dim]"
            )
        if tensor.ndim == 2 and tensor.shape[0] == 0:
            raise EmbeddingsError(f"token {token!r} in {path} has no vectors (shape {tuple(tensor.shape)}); "
                                  "expected [num_vectors, dim] with num_vectors >= 1: re-run `ray-dafusion invert`")
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
    tokens, vectors, names = [], [], {}
    vocab = pipe.tokenizer.get_vocab()
    for token, tensor in embeddings.items():
        rows = tensor if tensor.ndim == 2 else tensor[None]
        # multi-vector tokens follow diffusers' "<tok>", "<tok>_1", ... convention
        names[token] = [token] + [f"{token}_{i}" for i in range(1, rows.shape[0])]
        if token in vocab:
            _check_held(pipe, token, names[token], rows, vocab)
            continue  # already added with these very rows (an actor reused for a second batch)
        tokens.extend(names[token])
        vectors.extend(rows)
    for name, entry in taken_ignoring_case(tokens, vocab).items():
        raise EmbeddingsError(f"token {name!r} would read as the model's {entry!r}: the tokenizer lowercases "
                              "prompts, so tokens must differ in more than case")
    if tokens:
        pipe.load_textual_inversion(
            [v.detach() for v in vectors], token=tokens, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder
        )
    for token, group in names.items():  # each token now reads as its own rows, and nothing else
        read = pipe.tokenizer.encode(" ".join(group), add_special_tokens=False)
        if read != pipe.tokenizer.convert_tokens_to_ids(group):
            raise EmbeddingsError(f"token {token!r} reads back as {pipe.tokenizer.convert_ids_to_tokens(read)} with "
                                  "this model's tokenizer, not as itself (prompts are lowercased and normalised)")


def _check_held(pipe: Any, token: str, group: list[str], rows: Any, vocab: dict[str, int]) -> None:
    """A token the model already has must hold the file's rows: anything else would be used silently."""
    import torch

    weight = pipe.text_encoder.get_input_embeddings().weight
    same = all(name in vocab for name in group) and f"{token}_{len(group)}" not in vocab
    if same:
        held = weight[[vocab[name] for name in group]].detach()  # (num_vectors, dim)
        same = torch.equal(held, rows.detach().to(held.device, held.dtype))
    if not same:
        raise EmbeddingsError(f"token {token!r} is already in the model with another vector than the embeddings "
                              "file's (a model saved after textual inversion?): use the model without it, or "
                              "learn the token under another name")


class ErasureWeights:
    """The per-class UNet edits of an ``erase`` output, applied to a loaded UNet on demand.

    ``apply(unet, name)`` puts class ``name``'s erased weights into ``unet`` in place
    (``xattn``: original + delta for each cross-attention key/value weight; ``full``: that
    class's whole UNet state); ``apply(unet, None)`` restores the original weights. Only the
    affected original tensors are copied (once, the first time a UNet is seen), so swapping
    per class group is a few tensor copies and never reloads the pipeline. Class files are read
    lazily and kept in CPU memory, least recently used first out, within ``max_cache_bytes``
    (default 2 GiB: a ``full`` class is a whole UNet, ~3.4 GB for SD 1.x in fp32, so at most the
    class in use is kept; ``xattn`` deltas are small and many fit). ``max_cached`` also bounds the
    number of classes.
    """

    def __init__(self, uri: str, endpoint_url: Optional[str] = None, max_cached: Optional[int] = None,
                 max_cache_bytes: int = 2 << 30) -> None:
        manifest = storage.read_manifest(uri, endpoint_url)
        if manifest is None:
            raise FileNotFoundError(
                f"{uri} holds no complete erase output (no {storage.MANIFEST}); run `ray-dafusion erase` first"
            )
        if manifest.get("stage") != "erase" or manifest.get("method") not in ("full", "xattn"):
            raise ValueError(f"{uri} is not an erase output (stage {manifest.get('stage')!r}, "
                             f"method {manifest.get('method')!r})")
        self.uri = uri
        self.endpoint_url = endpoint_url
        self.method: str = manifest["method"]
        self.model_fingerprint: str = manifest.get("model_fingerprint") or ""  # the model it was made on
        self.max_cached = max_cached
        self.max_cache_bytes = max_cache_bytes
        self._classes: dict[str, dict[str, Any]] = dict(manifest.get("classes") or {})
        self._cache: dict[str, dict[str, Any]] = {}  # class -> tensors on CPU, most recent last
        self._originals: dict[str, Any] = {}  # parameter name -> original tensor of the UNet
        self._unet: Any = None  # weak reference to the UNet whose originals are held
        self._current: Optional[str] = None

    def classes(self) -> list[str]:
        """Class names that have an erasure."""
        return sorted(self._classes)

    def fingerprint(self, class_name: str) -> str:
        """Hash of that class's weights file (for lineage columns)."""
        return str(self._entry(class_name)["fingerprint"])

    def apply(self, unet: Any, class_name: Optional[str]) -> None:
        """Put `class_name`'s erased weights into `unet`, or the original ones for None."""
        import torch

        if class_name is not None:
            self._entry(class_name)  # unknown class: a clear error before touching the UNet
        if self._unet is None or self._unet() is not unet:  # a new UNet: start its originals afresh
            self._originals, self._current, self._unet = {}, None, weakref.ref(unet)
        if self._current == class_name:  # None: the UNet already holds its original weights
            return
        params = dict(unet.named_parameters())
        if class_name is None:
            with torch.no_grad():
                for name, original in self._originals.items():
                    params[name].copy_(original)
            self._current = None
            return
        tensors = self._load(class_name)
        known = set(params) if self.method == "xattn" else set(params) | {n for n, _ in unet.named_buffers()}
        unknown = [n for n in tensors if n not in known]
        if unknown:
            raise ValueError(
                f"erasure of {class_name!r} in {self.uri} does not fit this UNet: it has no {unknown[:3]}; "
                "the erasure was made for another model"
            )
        for name, tensor in tensors.items():  # every shape before any copy: a misfit leaves the UNet as it was
            if name in params and tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"erasure of {class_name!r}: {name} has shape {tuple(tensor.shape)}, "
                                 f"the UNet's is {tuple(params[name].shape)}: made for another model")
        with torch.no_grad():
            for name, tensor in tensors.items():
                if name not in params:
                    continue  # a buffer of a full state: never changed by training
                param = params[name]
                if name not in self._originals:  # xattn originals stay on the device; full ones on CPU
                    self._originals[name] = param.detach().clone() if self.method == "xattn" else param.detach().cpu().clone()
                original = self._originals[name]
                if self.method == "xattn":  # base + delta in fp32, then the UNet's dtype
                    new = original.float() + tensor.to(original.device, torch.float32)
                else:
                    new = tensor
                param.copy_(new.to(param.device, param.dtype))
        self._current = class_name

    def cached_bytes(self) -> int:
        """Bytes of class weights held in CPU memory now."""
        return sum(t.numel() * t.element_size() for tensors in self._cache.values() for t in tensors.values())

    def _entry(self, class_name: str) -> dict[str, Any]:
        if class_name not in self._classes:
            raise ValueError(
                f"no erasure for class {class_name!r} in {self.uri}; classes with one: {', '.join(self.classes()) or 'none'}"
            )
        return self._classes[class_name]

    def _load(self, class_name: str) -> dict[str, Any]:
        from safetensors.torch import load as load_safetensors

        if class_name in self._cache:
            self._cache[class_name] = self._cache.pop(class_name)  # most recently used last
            return self._cache[class_name]
        entry = self._entry(class_name)
        path = storage.join(self.uri, entry["file"])
        try:
            data = storage.read_bytes(path, self.endpoint_url)
        except FileNotFoundError:
            raise ValueError(f"erasure file of {class_name!r} is missing: {path}") from None
        if file_fingerprint(data) != entry["fingerprint"]:
            raise ValueError(f"erasure file {path} changed since `erase` wrote it (fingerprint mismatch)")
        tensors = load_safetensors(data)
        del data
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        while self._cache and (
            (self.max_cached is not None and len(self._cache) >= max(1, self.max_cached))
            or self.cached_bytes() + size > self.max_cache_bytes
        ):
            self._cache.pop(next(iter(self._cache)))  # least recently used
        self._cache[class_name] = tensors
        return tensors

"""Conditioning as an object: what a prior is conditioned on, its null for classifier-free guidance,
and the checks on what a user passes to `sample(n, cond=...)`.

Every conditioner turns a batch into a dict of tensors with the batch dimension first, so class
labels, text (token ids or embeddings with their mask), images concatenated to the network input
(super-resolution, inpainting models) and any combination travel the same path: through the
corruption process to the network, and through `cat_cond` into the doubled batch of guidance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ldm.distributed import draw_local
from ldm.util import PositiveInt

Cond = dict[str, torch.Tensor]


def cat_cond(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Cond:
    """Two conditioning dicts as one batch (conditional rows first): the guided forward pass."""
    if a.keys() != b.keys():
        raise ValueError(f"cannot join conditioning with keys {sorted(a)} and {sorted(b)}")
    return {k: torch.cat([a[k], b[k].to(a[k].device)]) for k in a}


def index_cond(cond: Mapping[str, torch.Tensor], index: torch.Tensor | slice) -> Cond:
    """The rows `index` of every entry."""
    return {k: v[index] for k, v in cond.items()}


def cond_to(cond: Mapping[str, torch.Tensor], device: torch.device | str) -> Cond:
    return {k: v.to(device) for k, v in cond.items()}


class Conditioner(nn.Module):
    """Base: `encode(batch)`, `null(n)`, `drop(cond, p)`, `from_user(value, n)`, `describe()`."""

    #: the keys of the dict `encode` returns
    keys: tuple[str, ...] = ()
    #: keys that dropout and guidance's null condition keep (a super-resolution stage's low-resolution input)
    kept_keys: tuple[str, ...] = ()

    def encode(self, batch: Mapping[str, Any], device: torch.device | str = "cpu") -> Cond:
        raise NotImplementedError

    def null(self, n: int, device: torch.device | str = "cpu") -> Cond:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def null_like(self, cond: Mapping[str, torch.Tensor]) -> Cond:
        """The null condition for the rows of `cond`: `null`, with the kept keys copied from `cond`."""
        n = next(iter(cond.values())).shape[0]
        device = next(iter(cond.values())).device
        return {**self.null(n, device), **{k: cond[k] for k in self.kept_keys}}

    @property
    def num_classes(self) -> int | None:
        """Classes of a class-label conditioner (for scripts that draw a row per class); else None."""
        return None

    @property
    def is_conditional(self) -> bool:
        return bool(self.keys)

    def drop(self, cond: Mapping[str, torch.Tensor], p: float, generator: torch.Generator | None = None) -> Cond:
        """Replace whole rows by the null condition with probability `p` (classifier-free guidance).

        The draw is made for the global batch and each rank keeps its rows, so a DDP run drops what a
        single process with the same global batch drops.
        """
        if not cond or p == 0.0:
            return dict(cond)
        n = next(iter(cond.values())).shape[0]
        device = next(iter(cond.values())).device
        gen_device = generator.device if generator is not None else device
        keep = draw_local(lambda m: torch.rand(m, generator=generator, device=gen_device), n, device).to(device) >= p
        null = self.null_like(cond)
        return {k: torch.where(keep.view(n, *[1] * (v.dim() - 1)), v, null[k].to(v.dtype)) for k, v in cond.items()}

    def from_user(self, value: Any, n: int, device: torch.device | str = "cpu") -> Cond:
        """Check and normalise what `sample(n, cond=value)` was given; say what was expected.

        None (or "null") is the null condition: what a prior trained with conditioning dropout
        models unconditionally.
        """
        if value is None or (isinstance(value, str) and value == "null"):
            return self.null(n, device)  # a conditional prior then samples unconditionally (dropout-trained)
        if not self.is_conditional:
            raise ValueError(f"this prior is unconditional: pass cond=None, got {type(value).__name__}")
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(self.keys))
            missing = sorted(set(self.keys) - set(value))
            if unknown or missing:
                raise ValueError(f"cond must have the keys {list(self.keys)} ({self.describe()}); "
                                 f"missing {missing}, unexpected {unknown}")
            return self.check(dict(value), n, device)
        if len(self.keys) != 1:
            raise ValueError(f"cond must be a dict with the keys {list(self.keys)} ({self.describe()})")
        return self.check({self.keys[0]: value}, n, device)

    def check(self, cond: dict[str, Any], n: int, device: torch.device | str) -> Cond:
        """Validate one user-given dict (entries with n rows); subclasses check values."""
        raise NotImplementedError


class Unconditional(Conditioner):
    """No conditioning: an empty dict everywhere."""

    keys = ()

    def encode(self, batch: Mapping[str, Any], device: torch.device | str = "cpu") -> Cond:
        return {}

    def null(self, n: int, device: torch.device | str = "cpu") -> Cond:
        return {}

    def describe(self) -> str:
        return "nothing (unconditional)"


class ClassLabel(Conditioner):
    """Class labels `batch[key]` (B,) long as `{"class_label": ...}`; the null class is `num_classes`."""

    def __init__(self, num_classes: int, key: str = "class_label", out_key: str = "class_label"):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self._num_classes, self.key, self.out_key = int(num_classes), key, out_key
        self.keys = (out_key,)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def encode(self, batch: Mapping[str, Any], device: torch.device | str = "cpu") -> Cond:
        if self.key not in batch:
            raise KeyError(f"the batch has no {self.key!r} (class labels); keys: {sorted(batch)}")
        return {self.out_key: torch.as_tensor(batch[self.key], device=device).long().view(-1)}

    def null(self, n: int, device: torch.device | str = "cpu") -> Cond:
        return {self.out_key: torch.full((n,), self._num_classes, dtype=torch.long, device=device)}

    def describe(self) -> str:
        return f"a class label or one per sample, in 0..{self._num_classes - 1}"

    def check(self, cond: dict[str, Any], n: int, device: torch.device | str) -> Cond:
        value = cond[self.out_key]
        try:
            labels = torch.as_tensor(value, device=device)
        except (TypeError, ValueError) as e:
            raise ValueError(f"cond must be {self.describe()}, got {value!r}") from e
        if labels.is_floating_point() and bool((labels != labels.round()).any()):
            raise ValueError(f"cond must be integer class labels ({self.describe()}), got {labels.tolist()}")
        labels = labels.long()
        labels = labels.expand(n) if labels.dim() == 0 else labels
        if labels.shape != (n,) or bool(((labels < 0) | (labels > self._num_classes)).any()):
            raise ValueError(f"cond must be {self.describe()} (or the null class {self._num_classes}) for "
                             f"{n} samples, got {labels.tolist()}")
        return {self.out_key: labels}


class Text(Conditioner):
    """Text as token ids (B, L) long or embeddings (B, L, D), with a mask (B, L) bool (True = a token).

    The null text is an all-False mask (and zero ids / embeddings), as Imagen's unconditional pass.
    """

    def __init__(self, max_length: int, kind: Literal["ids", "embeddings"] = "embeddings", dim: int | None = None,
                 vocab_size: int | None = None, key: str = "text", mask_key: str = "text_mask",
                 out_key: str = "context", out_mask_key: str = "context_mask"):
        super().__init__()
        if kind not in ("ids", "embeddings"):
            raise ValueError(f"kind must be 'ids' or 'embeddings', got {kind!r}")
        if kind == "embeddings" and not dim:
            raise ValueError("text embeddings need their dimension `dim`")
        self.max_length, self.kind, self.dim, self.vocab_size = int(max_length), kind, dim, vocab_size
        self.key, self.mask_key, self.out_key, self.out_mask_key = key, mask_key, out_key, out_mask_key
        self.keys = (out_key, out_mask_key)

    def _shape(self, n: int) -> tuple[int, ...]:
        return (n, self.max_length) if self.kind == "ids" else (n, self.max_length, int(self.dim))

    def encode(self, batch: Mapping[str, Any], device: torch.device | str = "cpu") -> Cond:
        text = torch.as_tensor(batch[self.key], device=device)
        mask = batch.get(self.mask_key)
        mask = torch.ones(text.shape[:2], dtype=torch.bool, device=device) if mask is None \
            else torch.as_tensor(mask, device=device).bool()
        return self.check({self.out_key: text, self.out_mask_key: mask}, text.shape[0], device)

    def null(self, n: int, device: torch.device | str = "cpu") -> Cond:
        dtype = torch.long if self.kind == "ids" else torch.float32
        return {self.out_key: torch.zeros(self._shape(n), dtype=dtype, device=device),
                self.out_mask_key: torch.zeros(n, self.max_length, dtype=torch.bool, device=device)}

    def describe(self) -> str:
        what = "token ids (n, L) long" if self.kind == "ids" else f"embeddings (n, L, {self.dim})"
        return f"{{{self.out_key!r}: {what}, {self.out_mask_key!r}: (n, L) bool}} with L <= {self.max_length}"

    def check(self, cond: dict[str, Any], n: int, device: torch.device | str) -> Cond:
        text = torch.as_tensor(cond[self.out_key], device=device)
        mask = torch.as_tensor(cond[self.out_mask_key], device=device).bool()
        want_dim = 2 if self.kind == "ids" else 3
        if text.dim() != want_dim or text.shape[0] != n or text.shape[1] > self.max_length \
                or (self.kind == "embeddings" and text.shape[2] != self.dim) or mask.shape != text.shape[:2]:
            raise ValueError(f"cond must be {self.describe()} for {n} samples, got text {tuple(text.shape)} "
                             f"and mask {tuple(mask.shape)}")
        if self.kind == "ids" and self.vocab_size and bool(((text < 0) | (text >= self.vocab_size)).any()):
            raise ValueError(f"token ids must be in 0..{self.vocab_size - 1}")
        pad = self.max_length - text.shape[1]  # pad to the trained length, padding masked out
        if pad:
            text = torch.cat([text, torch.zeros(n, pad, *text.shape[2:], dtype=text.dtype, device=device)], 1)
            mask = torch.cat([mask, torch.zeros(n, pad, dtype=torch.bool, device=device)], 1)
        return {self.out_key: text if self.kind == "ids" else text.float(), self.out_mask_key: mask}


class TokenizedCaption(Text):
    """Base of the caption conditioners: strings (`batch[key]`, or `sample(n, cond="a photo of a sandal")`) become
    token ids with their mask through `tokenize`; pre-tokenized ids (a tensor in the batch) pass as `Text`'s."""

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Strings to (ids (B, max_length) long, mask (B, max_length) bool)."""
        raise NotImplementedError

    def _ids(self, value: Any, n: int, device: torch.device | str) -> Cond:
        texts = [value] * n if isinstance(value, str) else list(value)
        if len(texts) != n or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"cond must be {self.describe()} for {n} samples, got {value!r}")
        ids, mask = self.tokenize(texts)
        return {self.out_key: ids.to(device), self.out_mask_key: mask.to(device)}

    def encode(self, batch: Mapping[str, Any], device: torch.device | str = "cpu") -> Cond:
        if self.key not in batch:
            raise KeyError(f"the batch has no {self.key!r} (captions); keys: {sorted(batch)}")
        value = batch[self.key]
        return self._ids(value, len(value), device) if not torch.is_tensor(value) else super().encode(batch, device)

    def from_user(self, value: Any, n: int, device: torch.device | str = "cpu") -> Cond:
        if isinstance(value, str) and value != "null" or (isinstance(value, (list, tuple)) and value
                                                          and all(isinstance(v, str) for v in value)):
            return self._ids(value, n, device)
        if value is None or value == "null" or isinstance(value, Mapping):
            return super().from_user(value, n, device)
        raise ValueError(f"cond must be {self.describe()} for {n} samples, got {value!r}")


class Caption(TokenizedCaption):
    """Captions as UTF-8 byte ids with their mask, for a byte-level text encoder; the null caption is the empty one."""

    def __init__(self, max_length: int = 32, key: str = "caption", out_key: str = "context",
                 out_mask_key: str = "context_mask"):
        from ldm.nn.text import BYTE_VOCAB

        super().__init__(max_length, kind="ids", vocab_size=BYTE_VOCAB, key=key, out_key=out_key,
                         out_mask_key=out_mask_key)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from ldm.nn.text import byte_ids

        return byte_ids(texts, self.max_length)

    def describe(self) -> str:
        return f"a caption or one per sample (strings, up to {self.max_length} UTF-8 bytes are used)"


class HFCaption(TokenizedCaption):
    """Captions through a pretrained Hugging Face tokenizer (`name`: a hub name or a local directory, the one its
    text encoder was loaded from), padded to `max_length` with its attention mask.

    The null caption is the tokenized empty string, as latent-diffusion's and Stable Diffusion's unconditional
    pass (an encoder that ignores the mask still sees what it was trained on). `transformers` is imported and the
    tokenizer loaded when the first caption is tokenized, so a config builds (meta device, checks) offline.
    """

    def __init__(self, name: str, max_length: PositiveInt = 77, vocab_size: PositiveInt | None = None,
                 key: str = "caption", out_key: str = "context", out_mask_key: str = "context_mask"):
        super().__init__(max_length, kind="ids", vocab_size=vocab_size, key=key, out_key=out_key,
                         out_mask_key=out_mask_key)
        self.name = str(name)
        self._tokenizer: Any = None

    def load_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.name)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from ldm.nn.hf_text import unavailable_hint

            try:
                tokenizer = self.load_tokenizer()
            except (OSError, ValueError) as e:  # not on the hub, not cached offline, or a folder without its files
                raise ValueError(f"cannot load the tokenizer {self.name!r} of {type(self).__name__}: {e}\n"
                                 f"{unavailable_hint(self.name)}") from e
            if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):  # transformers 5 may build an empty one
                raise ValueError(f"the tokenizer {self.name!r} of {type(self).__name__} has no vocabulary beyond its "
                                 "special tokens: its files (vocab.txt, tokenizer.json) were not found there or in "
                                 f"the Hugging Face cache\n{unavailable_hint(self.name)}")
            if self.vocab_size is not None and len(tokenizer) > self.vocab_size:
                raise ValueError(f"the tokenizer {self.name!r} has {len(tokenizer)} tokens, more than the "
                                 f"vocab_size {self.vocab_size} its text encoder embeds: another tokenizer?")
            self._tokenizer = tokenizer
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return enc["input_ids"].long(), enc["attention_mask"].bool()

    def null(self, n: int, device: torch.device | str = "cpu") -> Cond:
        ids, mask = self.tokenize([""])
        return {self.out_key: ids.repeat(n, 1).to(device), self.out_mask_key: mask.repeat(n, 1).to(device)}

    def describe(self) -> str:
        return f"a caption or one per sample (strings, up to {self.max_length} tokens of the {self.name} tokenizer)"


class BERTCaption(HFCaption):
    """latent-diffusion's `BERTTokenizer` for its LAION text-to-image model (`ldm.nn.bert.BERTEmbedder`):
    bert-base-uncased's WordPiece ids, 77 with [CLS] and [SEP], padded with [PAD] (0); `tokenizer_path` loads
    the same tokenizer from a local directory (its `vocab.txt`, or a `save_pretrained` folder) instead."""

    def __init__(self, max_length: PositiveInt = 77, tokenizer_path: str | None = None, key: str = "caption",
                 out_key: str = "context", out_mask_key: str = "context_mask"):
        from ldm.nn.bert import BERT_VOCAB

        super().__init__(tokenizer_path or "bert-base-uncased", max_length, vocab_size=BERT_VOCAB, key=key,
                         out_key=out_key, out_mask_key=out_mask_key)

    def load_tokenizer(self) -> Any:
        from transformers import BertTokenizerFast

        return BertTokenizerFast.from_pretrained(self.name)


class ConcatImage(Conditioner):
    """An image `batch[key]` (B, C, H, W) in [-1, 1] to concatenate to the network input (low-resolution
    image of a super-resolution stage, masked image + mask of an inpainting model); null is zeros."""

    def __init__(self, shape: Sequence[int], key: str = "lr_image", out_key: str = "concat"):
        super().__init__()
        if len(shape) != 3:
            raise ValueError(f"shape must be (C, H, W), got {list(shape)}")
        self.shape, self.key, self.out_key = tuple(int(s) for s in shape), key, out_key
        self.keys = (out_key,)

    def encode(self, batch: Mapping[str, Any], device: torch.device | str = "cpu") -> Cond:
        image = torch.as_tensor(batch[self.key], device=device).float()
        return self.check({self.out_key: image}, image.shape[0], device)

    def null(self, n: int, device: torch.device | str = "cpu") -> Cond:
        return {self.out_key: torch.zeros(n, *self.shape, device=device)}

    def describe(self) -> str:
        return f"an image batch (n, {', '.join(map(str, self.shape))})"

    def check(self, cond: dict[str, Any], n: int, device: torch.device | str) -> Cond:
        image = torch.as_tensor(cond[self.out_key], device=device).float()
        if tuple(image.shape) != (n, *self.shape):
            raise ValueError(f"cond must be {self.describe()} for {n} samples, got {tuple(image.shape)}")
        return {self.out_key: image}


class LowResImage(Conditioner):
    """A super-resolution stage's input: the batch's image (B, C, H, W) shrunk to `size` x `size` (area
    average), then brought back to H x W (bilinear) and concatenated to the network input, with its noise
    level `aug_level` (0: clean; the stage's noise augmentation sets it). Both are kept by dropout and by the
    null condition: guidance drops the class or text, never the image being upsampled. A user (the cascade)
    passes the low-resolution images, (n, C, size, size)."""

    kept_keys = ("concat", "aug_level")

    def __init__(self, shape: Sequence[int], size: PositiveInt, key: str = "image"):
        super().__init__()
        if len(shape) != 3:
            raise ValueError(f"shape must be (C, H, W), got {list(shape)}")
        self.shape, self.size, self.key = tuple(int(s) for s in shape), int(size), key
        if self.size >= min(self.shape[1:]):
            raise ValueError(f"size {self.size} must be below the stage's resolution {self.shape[1:]}")
        self.keys, self.out_key = ("concat", "aug_level"), "concat"

    def upsample(self, low: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(low, size=self.shape[1:], mode="bilinear", align_corners=False)

    def encode(self, batch: Mapping[str, Any], device: torch.device | str = "cpu") -> Cond:
        image = torch.as_tensor(batch[self.key], device=device).float()
        low = nn.functional.interpolate(image, size=(self.size, self.size), mode="area")
        return {"concat": self.upsample(low), "aug_level": torch.zeros(image.shape[0], device=device)}

    def null(self, n: int, device: torch.device | str = "cpu") -> Cond:
        return {"concat": torch.zeros(n, *self.shape, device=device), "aug_level": torch.zeros(n, device=device)}

    def describe(self) -> str:
        return f"low-resolution images (n, {self.shape[0]}, {self.size}, {self.size}) in [-1, 1]"

    def from_user(self, value: Any, n: int, device: torch.device | str = "cpu") -> Cond:
        if isinstance(value, torch.Tensor):
            return self.check({"concat": value, "aug_level": torch.zeros(n)}, n, device)
        return super().from_user(value, n, device)

    def check(self, cond: dict[str, Any], n: int, device: torch.device | str) -> Cond:
        """`concat`: the low-resolution images, or this stage's upsampled ones (a copy of a checked cond)."""
        low = torch.as_tensor(cond["concat"], device=device).float()
        level = torch.as_tensor(cond["aug_level"], device=device).float().reshape(-1)
        if level.numel() != n:
            raise ValueError(f"aug_level must hold one noise level per sample ({n}), got {level.numel()}")
        if tuple(low.shape) == (n, *self.shape):
            return {"concat": low, "aug_level": level}
        if tuple(low.shape) != (n, self.shape[0], self.size, self.size):
            raise ValueError(f"this super-resolution stage takes {self.describe()} for {n} samples, got "
                             f"{tuple(low.shape)}: the stage before it must output {self.size} x {self.size}")
        return {"concat": self.upsample(low), "aug_level": level}


class Combined(Conditioner):
    """Several conditioners at once (e.g. class + concatenated image); they are dropped together."""

    def __init__(self, conditioners: Mapping[str, Mapping[str, Any]]):
        from ldm.util import instantiate_from_config

        super().__init__()
        self.parts = nn.ModuleDict({name: instantiate_from_config(cfg, key=f"conditioner_config.params."
                                                                          f"conditioners.{name}")
                                    for name, cfg in conditioners.items()})
        keys = [k for part in self.parts.values() for k in part.keys]
        if len(set(keys)) != len(keys):
            raise ValueError(f"conditioners produce overlapping keys: {keys}")
        self.keys = tuple(keys)
        self.kept_keys = tuple(k for part in self.parts.values() for k in part.kept_keys)

    @property
    def num_classes(self) -> int | None:
        return next((p.num_classes for p in self.parts.values() if p.num_classes), None)

    def encode(self, batch: Mapping[str, Any], device: torch.device | str = "cpu") -> Cond:
        return {k: v for part in self.parts.values() for k, v in part.encode(batch, device).items()}

    def null(self, n: int, device: torch.device | str = "cpu") -> Cond:
        return {k: v for part in self.parts.values() for k, v in part.null(n, device).items()}

    def describe(self) -> str:
        return "a dict with " + "; ".join(f"{name}: {part.describe()}" for name, part in self.parts.items())

    def check(self, cond: dict[str, Any], n: int, device: torch.device | str) -> Cond:
        out: Cond = {}
        for part in self.parts.values():
            out.update(part.check({k: cond[k] for k in part.keys}, n, device))
        return out

"""Frozen pretrained text encoders from Hugging Face `transformers` for the Gaussian prior's cross-attention:
T5's encoder (Imagen conditions on T5-XXL's) or CLIP's text transformer (Stable Diffusion on ViT-L/14's).

They are loaded with `from_pretrained(name)` (a hub name on a user's machine, or a local directory), kept in
eval mode without gradients, and never trained: only the UNet learns to read them. Their tokenizer is the
conditioner's (`ldm.conditioning.HFCaption` with the same `name`), so strings become ids where every caption
does. `transformers` is imported only when such an encoder is built.

Like the frozen first stage, the weights sit in the prior's state dict (a checkpoint holds them); the EMA copy
shares them instead of duplicating an encoder that never changes (see `__deepcopy__`).
"""

from __future__ import annotations

import copy
import os
from typing import Any, Literal

import torch
from torch import nn

from ldm.util import PositiveInt

KINDS = ("t5", "clip")
DTYPES = ("float32", "bfloat16", "float16")
#: the text conditioning that needs no download (UTF-8 bytes and a small encoder trained with the prior)
OFFLINE_ALTERNATIVE = ("the byte-level text encoder: cond_stage_config target ldm.nn.text.ByteTextEncoder with "
                       "conditioner_config target ldm.conditioning.Caption (as configs/test/ldm_text.yaml)")


#: google/t5-v1_1-* encoders (Imagen's T5-XXL is the last): d_model, d_ff, heads, layers of their hub config.json
T5_V1_1 = {"small": (512, 1024, 6, 8), "base": (768, 2048, 12, 12), "large": (1024, 2816, 16, 24),
           "xl": (2048, 5120, 32, 24), "xxl": (4096, 10240, 64, 24)}


def meta_config(config_class: Any, name: str) -> Any:
    """The encoder's configuration for a meta-device build, where `from_pretrained` refuses to run: the folder's
    config.json, or for a google/t5-v1_1-* name its known shape, so Imagen's configs are checked and counted
    offline; other hub names need the network or the cache."""
    size = name.removeprefix("google/t5-v1_1-")
    if not os.path.isdir(name) and name.startswith("google/t5-v1_1-") and size in T5_V1_1:
        d_model, d_ff, heads, layers = T5_V1_1[size]
        return config_class(vocab_size=32128, d_model=d_model, d_kv=64, d_ff=d_ff, num_heads=heads,
                            num_layers=layers, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    return config_class.from_pretrained(name)


def unavailable_hint(name: str) -> str:
    """What to do when `name` does not load: a hub name (google/t5-v1_1-xxl) needs the network or the Hugging Face
    cache, which machines without either lack; a local directory only needs its files."""
    if os.path.isdir(name):
        return f"the folder {name!r} must hold a save_pretrained copy (config, weights, tokenizer files)"
    return (f"{name!r} is no folder here, so a hub name: it is not in the Hugging Face cache and the hub cannot be "
            f"reached (offline, or HF_HUB_OFFLINE=1) or has no such model; download it where there is a network and "
            f"pass its folder as name, or, offline, use {OFFLINE_ALTERNATIVE}")


class FrozenHFTextEncoder(nn.Module):
    """`forward(ids (B, L) long, mask (B, L) bool) -> (B, L, dim)`: the encoder's last hidden states.

    `use_mask` (None: per kind) says whether the tokenizer's padding is masked, in the encoder and in the UNet's
    cross-attention: T5 masks it (Imagen), CLIP does not (Stable Diffusion feeds all 77 positions, padding
    included, which its causal encoder computes from the caption alone).
    """

    def __init__(self, kind: Literal["t5", "clip"], name: str, max_length: PositiveInt = 77,
                 use_mask: bool | None = None, dtype: Literal["float32", "bfloat16", "float16"] = "float32"):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))} (a T5 encoder or a CLIP text "
                             f"model), got {kind!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(map(repr, DTYPES))}, got {dtype!r}")
        if kind == "t5":
            from transformers import T5EncoderModel as model_class
        else:
            from transformers import CLIPTextModel as model_class
        try:
            if torch.empty(0).device.type == "meta":  # a config check or parameter count: no weights to load
                encoder = model_class(meta_config(model_class.config_class, str(name)))
            else:
                encoder = model_class.from_pretrained(name)
        except OSError as e:  # not on the hub, not cached offline, or a folder without the model's files
            raise ValueError(f"name: cannot load the {kind} text encoder {name!r} ({model_class.__name__}."
                             f"from_pretrained): {e}\n{unavailable_hint(str(name))}") from e
        encoder.to(getattr(torch, dtype)).eval().requires_grad_(False)
        config = encoder.config
        if kind == "clip" and max_length > config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} is more than the {config.max_position_embeddings} positions "
                             f"of the CLIP text model {name!r}")
        self.encoder = encoder
        self.kind, self.name, self.max_length = kind, str(name), max_length
        self.use_mask = (kind == "t5") if use_mask is None else bool(use_mask)
        self.vocab_size = int(config.vocab_size)
        self.dim = int(config.d_model if kind == "t5" else config.hidden_size)

    consumes = ("context",)

    def train(self, mode: bool = True) -> FrozenHFTextEncoder:
        super().train(mode)
        self.encoder.eval()  # frozen: its dropout never runs, whatever the prior's mode
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenHFTextEncoder:
        """A copy that shares the frozen encoder: the prior's EMA copy of it would average constants."""
        memo[id(self.encoder)] = self.encoder
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def condition(self, cond: dict[str, Any]) -> dict[str, Any]:
        """The conditioning dict with its token ids replaced by the encoder's embeddings (and the mask `use_mask` says)."""
        ids, mask = cond["context"], cond["context_mask"].bool()
        out_mask = mask if self.use_mask else torch.ones_like(mask)
        return {**cond, "context": self(ids, mask), "context_mask": out_mask}

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(f"the {self.kind} encoder takes token ids (B, L) long, got {tuple(ids.shape)} {ids.dtype}")
        if ids.shape[1] > self.max_length:
            raise ValueError(f"{ids.shape[1]} tokens are more than the encoder's max_length {self.max_length}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids outside the {self.vocab_size} of {self.name!r}: is the conditioner's tokenizer "
                             f"this encoder's (ldm.conditioning.HFCaption with name {self.name!r})?")
        attention = mask.long() if (self.use_mask and mask is not None) else None
        out = self.encoder(input_ids=ids.long(), attention_mask=attention).last_hidden_state
        return out.float()  # (B, L, dim)

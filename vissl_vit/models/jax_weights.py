"""Google's JAX/Flax ViT checkpoints (``.npz``): reading them, and their names mapped to timm's.

The layouts are those of google-research/vision_transformer (the ViT paper's and AugReg's
releases) and big_vision (which RescaleViT and SigLIP fine-tune from): Flax module paths joined
by ``/``, Dense kernels stored [in, out], attention kernels per head. The same set timm's
``vision_transformer._load_weights`` reads:

==============================================  ======================================  ====================
file (prefix ``""``, ``opt/target/``,           shape                                   timm's name
``params/`` or ``params/img/``)
==============================================  ======================================  ====================
``embedding/kernel``, ``/bias``                 [p, p, C, D], [D]                       ``patch_embed.proj``
``cls`` (absent in ``gap`` models)              [1, 1, D]                               ``cls_token``
``Transformer/posembed_input/pos_embedding``    [1, prefix + N, D]                      ``pos_embed``
``pos_embedding`` (big_vision, no class slot)   [1, N, D]                               ``pos_embed``
``Transformer/encoderblock_{i}/LayerNorm_0``    [D]                                     ``blocks.i.norm1``
``.../MultiHeadDotProductAttention_1/query``    kernel [D, H, d], bias [H, d]           ``blocks.i.attn.qkv``
(``key``, ``value``; concatenated q, k, v)
``.../MultiHeadDotProductAttention_1/out``      kernel [H, d, D], bias [D]              ``blocks.i.attn.proj``
``.../LayerNorm_2``                             [D]                                     ``blocks.i.norm2``
``.../MlpBlock_3/Dense_0``, ``Dense_1``         kernel [in, out]                        ``blocks.i.mlp.fc1/2``
``Transformer/encoder_norm``                    [D]                                     ``norm``
``pre_logits/kernel``, ``/bias`` (optional)     [D, R]                                  ``pre_logits.fc``
``head/kernel``, ``/bias``                      [D or R, K]                             ``head``
==============================================  ======================================  ====================

big_vision numbers the sub-modules of a block per type (``MultiHeadDotProductAttention_0``,
``LayerNorm_1``, ``MlpBlock_0``) where the original numbers them in order of creation (``_1``,
``_2``, ``_3``); each block's numbering is read from the names it has. A scanned encoder
(``Transformer/encoderblock/...``, every array with a leading [depth] axis) is unstacked. Keys
with no timm counterpart (a MAP head's ``MAPHead_0/*``, a hybrid's ResNet stem, another tower of a
two-tower model) keep their names under ``jax.``, so that a strict load lists them.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import torch

from vissl_vit.errors import UserError

# where the image model's parameters start, in the order timm tries them
_PREFIXES = ("", "opt/target/", "params/", "params/img/")
_PATCH = "embedding/kernel"
# (attention, second norm, MLP) sub-module numbers: google-research/vision_transformer, big_vision
_NUMBERINGS = ((1, 2, 3), (0, 1, 0))
UNMAPPED = "jax."


def is_npz(data: bytes) -> bool:
    """Whether ``data`` is a numpy ``.npz`` archive (a zip of ``.npy`` files, unlike torch's zip files)."""
    if not data.startswith(b"PK\x03\x04"):
        return False
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile:
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def _to_tensor(array: np.ndarray, key: str, name: str) -> torch.Tensor:
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        # bfloat16 (ml_dtypes), which numpy stores as raw 2-byte records: reinterpret the bits
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16)).view(torch.bfloat16)
    if array.dtype.kind not in "fiub":
        raise UserError(f"{name}: array '{key}' has dtype {array.dtype}, not a number type.")
    return torch.from_numpy(np.array(array))


def read_npz(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """An ``.npz`` file's arrays as tensors under their names in the file (no pickles are loaded).

    Args:
        data: the file's bytes.
        name: the file's name, for messages.
    """
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {key: _to_tensor(npz[key], key, name) for key in npz.files}
    except ValueError as e:  # object arrays need pickles, refused by allow_pickle=False
        raise UserError(f"Could not read {name} as an .npz file of arrays: {e}") from None


def find_prefix(keys: list[str]) -> str | None:
    """The prefix under which the image model's parameters are (see the module docstring), or None."""
    ks = set(keys)
    for prefix in _PREFIXES:
        if prefix + _PATCH in ks:
            return prefix
    others = sorted(k[: -len(_PATCH)] for k in ks if k.endswith("/" + _PATCH))
    return others[0] if len(others) == 1 else None


def is_jax_layout(keys: list[str]) -> bool:
    """Whether a flat state dict's names are a Flax ViT's (see the module docstring)."""
    return find_prefix(keys) is not None


class _Converter:
    """Moves the file's arrays, under timm's names and layouts, into ``out``; what it takes is
    removed from ``rest``, so what is left at the end has no counterpart."""

    def __init__(self, sd: dict[str, torch.Tensor], prefix: str) -> None:
        self.rest = dict(sd)
        self.prefix = prefix
        self.out: dict[str, torch.Tensor] = {}

    def has(self, *names: str) -> bool:
        return all(self.prefix + n in self.rest for n in names)

    def take(self, name: str, idx: int | None) -> torch.Tensor:
        value = self.rest.pop(self.prefix + name)
        return value[idx] if idx is not None else value

    def dense(self, src: str, dst: str, idx: int | None = None) -> None:
        """A Dense layer: kernel [in, out] -> weight [out, in]; bias as it is."""
        if self.has(f"{src}/kernel"):
            self.out[f"{dst}.weight"] = self.take(f"{src}/kernel", idx).t()
        self.copy(f"{src}/bias", f"{dst}.bias", idx)

    def copy(self, src: str, dst: str, idx: int | None = None) -> None:
        if self.has(src):
            self.out[dst] = self.take(src, idx)

    def norm(self, src: str, dst: str, idx: int | None = None) -> None:
        self.copy(f"{src}/scale", f"{dst}.weight", idx)
        self.copy(f"{src}/bias", f"{dst}.bias", idx)

    def attention(self, src: str, dst: str, idx: int | None) -> None:
        # query / key / value kernels [D, H, d] -> rows of timm's fused qkv [3 * H * d, D];
        # biases [H, d] -> [3 * H * d]
        qkv = ("query", "key", "value")
        for part, suffix in (("kernel", "weight"), ("bias", "bias")):
            if self.has(*(f"{src}/{n}/{part}" for n in qkv)):
                arrays = [self.take(f"{src}/{n}/{part}", idx) for n in qkv]
                if part == "kernel":
                    arrays = [a.reshape(a.shape[0], -1).t() for a in arrays]
                else:
                    arrays = [a.reshape(-1) for a in arrays]
                self.out[f"{dst}.qkv.{suffix}"] = torch.cat(arrays, dim=0)
        if self.has(f"{src}/out/kernel"):  # [H, d, D] -> [D, H * d]
            kernel = self.take(f"{src}/out/kernel", idx)
            self.out[f"{dst}.proj.weight"] = kernel.reshape(-1, kernel.shape[-1]).t()
        self.copy(f"{src}/out/bias", f"{dst}.proj.bias", idx)

    def block(self, src: str, dst: str, idx: int | None) -> None:
        numbering = next((n for n in _NUMBERINGS if self.has(f"{src}/MlpBlock_{n[2]}/Dense_0/kernel")), None)
        if numbering is None:
            found = sorted(k for k in self.rest if k.startswith(self.prefix + src + "/"))
            raise UserError(
                f"The .npz block {self.prefix}{src} has neither MlpBlock_3 (google-research/vision_transformer) "
                f"nor MlpBlock_0 (big_vision); its keys: {', '.join(found[:8]) or 'none'}."
            )
        mha, ln2, mlp = numbering
        self.norm(f"{src}/LayerNorm_0", f"{dst}.norm1", idx)
        self.attention(f"{src}/MultiHeadDotProductAttention_{mha}", f"{dst}.attn", idx)
        self.norm(f"{src}/LayerNorm_{ln2}", f"{dst}.norm2", idx)
        self.dense(f"{src}/MlpBlock_{mlp}/Dense_0", f"{dst}.mlp.fc1", idx)
        self.dense(f"{src}/MlpBlock_{mlp}/Dense_1", f"{dst}.mlp.fc2", idx)


def jax_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Flax ViT's flat state dict (names joined by ``/``) -> timm ``VisionTransformer``'s names and layouts.

    Args:
        sd: the file's arrays, as :func:`read_npz` returns them.
    """
    prefix = find_prefix(list(sd))
    if prefix is None:
        raise UserError(f"Not a JAX ViT checkpoint: no '{_PATCH}' among its keys ({', '.join(list(sd)[:6])}).")
    c = _Converter(sd, prefix)
    if c.has(_PATCH):  # [p, p, C, D] -> [D, C, p, p]
        c.out["patch_embed.proj.weight"] = c.take(_PATCH, None).permute(3, 2, 0, 1)
    c.copy("embedding/bias", "patch_embed.proj.bias")
    c.copy("cls", "cls_token")
    c.copy("Transformer/posembed_input/pos_embedding", "pos_embed")
    c.copy("pos_embedding", "pos_embed")
    if c.has("Transformer/encoderblock/LayerNorm_0/scale"):  # scanned: [depth, ...] arrays
        depth = sd[prefix + "Transformer/encoderblock/LayerNorm_0/scale"].shape[0]
        stacked = [k for k in c.rest if k.startswith(prefix + "Transformer/encoderblock/")]
        for i in range(depth):
            for k in stacked:  # each block reads its slice of every stacked array
                c.rest.setdefault(k, sd[k])
            c.block("Transformer/encoderblock", f"blocks.{i}", i)
    else:
        i = 0
        while c.has(f"Transformer/encoderblock_{i}/LayerNorm_0/scale"):
            c.block(f"Transformer/encoderblock_{i}", f"blocks.{i}", None)
            i += 1
    c.norm("Transformer/encoder_norm", "norm")
    c.dense("pre_logits", "pre_logits.fc")
    c.dense("head", "head")
    c.out.update({UNMAPPED + k: v for k, v in c.rest.items()})
    return c.out

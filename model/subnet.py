"""Standalone subnets exported from a supernet.

An exported subnet is a plain ViT built from ``nn.Conv2d``, ``nn.Linear``, ``nn.LayerNorm`` and
parameters that hold copies of the supernet's sliced weights, so it runs, traces and exports
without the supernet. On disk it is a directory with ``config.json`` (the architecture) and
``model.pth`` (the state dict).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.layers import QKV_GROUPED, QKV_INTERLEAVED, attention, gelu_float32, relative_position_index

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pth"
FORMAT_VERSION = 1


class SubnetBlock(nn.Module):
    """One pre-norm or post-norm encoder block of fixed size.

    Args:
        embed_dim: block width.
        out_dim: output width of fc2 (the next block's embed dim).
        num_heads: heads.
        qkv_width: q/k/v width (the sum over heads of the head dim).
        hidden_dim: MLP hidden width.
        num_tokens: tokens per image, cls token included, for the relative-position index.
        qkv_layout: q/k/v row order of the qkv weight, ``"interleaved"`` or ``"grouped"``.
        relative_position: whether the block has relative-position tables.
        max_relative_position: distance clip of the tables.
        pre_norm: layer norm before each branch (True) or after each residual sum (False).
        qk_scale: fixed attention scale, or None for ``head_dim ** -0.5``.
    """

    def __init__(
        self,
        embed_dim: int,
        out_dim: int,
        num_heads: int,
        qkv_width: int,
        hidden_dim: int,
        num_tokens: int,
        qkv_layout: str,
        relative_position: bool,
        max_relative_position: int,
        pre_norm: bool,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv_layout = qkv_layout
        self.pre_norm = pre_norm
        self.scale = qk_scale if qk_scale is not None else (qkv_width // num_heads) ** -0.5
        self.attn_layer_norm = nn.LayerNorm(embed_dim, eps=1e-5)
        self.qkv = nn.Linear(embed_dim, 3 * qkv_width, bias=qkv_bias)
        self.proj = nn.Linear(qkv_width, embed_dim)
        self.relative_position = relative_position
        if relative_position:
            rows = 2 * (2 * max_relative_position + 2)
            head_dim = qkv_width // num_heads
            self.rel_k_table = nn.Parameter(torch.zeros(rows, head_dim))
            self.rel_v_table = nn.Parameter(torch.zeros(rows, head_dim))
            self.register_buffer(
                "rel_index", relative_position_index(num_tokens, max_relative_position), persistent=False
            )
        self.ffn_layer_norm = nn.LayerNorm(embed_dim, eps=1e-5)
        self.fc1 = nn.Linear(embed_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        tables = (self.rel_k_table, self.rel_v_table, self.rel_index) if self.relative_position else (None, None, None)
        return attention(
            x,
            self.qkv.weight,
            self.qkv.bias,
            self.proj.weight,
            self.proj.bias,
            self.num_heads,
            self.scale,
            self.qkv_layout,
            *tables,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            x = x + self._attention(self.attn_layer_norm(x))
            return x + self.fc2(gelu_float32(self.fc1(self.ffn_layer_norm(x))))
        x = self.attn_layer_norm(x + self._attention(x))
        return self.ffn_layer_norm(x + self.fc2(gelu_float32(self.fc1(x))))


class SubnetViT(nn.Module):
    """A fixed ViT subnet, built from the ``config`` that :func:`export_subnet` records.

    Args:
        config: architecture dict with keys ``img_size, patch_size, in_chans, num_classes,
            candidate, qkv_layout, relative_position, max_relative_position, abs_pos, pre_norm, gp,
            qkv_bias, qk_scale``; ``candidate`` is the candidate dict of the subnet.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        candidate = config["candidate"]
        embed_dims = candidate["embed_dim"]
        embed = embed_dims[0]
        patch = config["patch_size"]
        num_patches = (config["img_size"] // patch) ** 2
        interleaved = config["qkv_layout"] == QKV_INTERLEAVED

        self.img_size = config["img_size"]
        self.gp = config["gp"]
        self.pre_norm = config["pre_norm"]
        self.abs_pos = config["abs_pos"]
        self.patch_embed = nn.Conv2d(config["in_chans"], embed, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed))
        if self.abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed))

        blocks = []
        for index in range(candidate["layer_num"]):
            heads = candidate["num_heads"][index]
            out_dim = embed_dims[index + 1] if index + 1 < candidate["layer_num"] else embed_dims[-1]
            blocks.append(
                SubnetBlock(
                    embed_dim=embed_dims[index],
                    out_dim=out_dim,
                    num_heads=heads,
                    qkv_width=64 * heads if interleaved else config["qkv_width"],
                    hidden_dim=int(embed_dims[index] * candidate["mlp_ratio"][index]),
                    num_tokens=num_patches + 1,
                    qkv_layout=config["qkv_layout"],
                    relative_position=config["relative_position"],
                    max_relative_position=config["max_relative_position"],
                    pre_norm=self.pre_norm,
                    qkv_bias=config["qkv_bias"],
                    qk_scale=config["qk_scale"],
                )
            )
        self.blocks = nn.Sequential(*blocks)
        if self.pre_norm:
            self.norm = nn.LayerNorm(embed_dims[-1], eps=1e-5)
        self.head = nn.Linear(embed_dims[-1], config["num_classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.abs_pos:
            x = x + self.pos_embed
        x = self.blocks(x)
        if self.pre_norm:
            x = self.norm(x)
        x = x[:, 1:].mean(dim=1) if self.gp else x[:, 0]
        return self.head(x)


@torch.no_grad()
def export_subnet(supernet: nn.Module, candidate: Mapping[str, Any] | None = None) -> SubnetViT:
    """Copy the weights of one subnet out of ``supernet`` into a standalone :class:`SubnetViT`.

    Args:
        supernet: a :class:`model.supernet.Supernet`.
        candidate: the subnet; None exports the supernet's active subnet.

    Returns:
        The subnet in eval mode, on the supernet's device and dtype. Dropout and drop path are
        not exported: the subnet is for inference and fine-tuning starts from the supernet.
    """
    candidate = supernet.subnet if candidate is None else supernet.check_candidate(candidate)
    candidate = {key: candidate[key] for key in ("layer_num", "embed_dim", "mlp_ratio", "num_heads")}
    first_attention = supernet.blocks[0].attn
    config = {
        "format_version": FORMAT_VERSION,
        "img_size": supernet.img_size,
        "patch_size": supernet.patch_size,
        "in_chans": supernet.in_chans,
        "num_classes": supernet.num_classes,
        "candidate": candidate,
        "qkv_layout": QKV_INTERLEAVED if supernet.change_qkv else QKV_GROUPED,
        "qkv_width": supernet.super_embed_dim,
        "relative_position": supernet.relative_position,
        "max_relative_position": supernet.max_relative_position,
        "abs_pos": supernet.abs_pos,
        "pre_norm": supernet.pre_norm,
        "gp": supernet.gp,
        "qkv_bias": first_attention.qkv.bias is not None,
        "qk_scale": first_attention.qk_scale,
    }
    reference = next(supernet.parameters())
    subnet = SubnetViT(config).to(device=reference.device, dtype=reference.dtype)

    previous = supernet.subnet
    supernet.set_subnet(candidate)
    try:
        embed = candidate["embed_dim"][0]
        subnet.patch_embed.weight.copy_(supernet.patch_embed_super.proj.weight[:embed])
        subnet.patch_embed.bias.copy_(supernet.patch_embed_super.proj.bias[:embed])
        subnet.cls_token.copy_(supernet.cls_token[..., :embed])
        if subnet.abs_pos:
            subnet.pos_embed.copy_(supernet.pos_embed[..., :embed])
        for source, target in zip(supernet.blocks, subnet.blocks):
            _copy_block(source, target)
        if subnet.pre_norm:
            _copy_layer_norm(supernet.norm, subnet.norm)
        subnet.head.weight.copy_(supernet.head.sliced_weight())
        subnet.head.bias.copy_(supernet.head.sliced_bias())
    finally:
        supernet.set_subnet(previous)
    return subnet.eval()


def _copy_layer_norm(source: nn.Module, target: nn.LayerNorm) -> None:
    target.weight.copy_(source.weight[: source.active_dim])
    target.bias.copy_(source.bias[: source.active_dim])


def _copy_linear(source: nn.Module, target: nn.Linear) -> None:
    target.weight.copy_(source.sliced_weight())
    if target.bias is not None:
        target.bias.copy_(source.sliced_bias())


def _copy_block(source: nn.Module, target: SubnetBlock) -> None:
    _copy_layer_norm(source.attn_layer_norm, target.attn_layer_norm)
    _copy_layer_norm(source.ffn_layer_norm, target.ffn_layer_norm)
    _copy_linear(source.attn.qkv, target.qkv)
    _copy_linear(source.attn.proj, target.proj)
    _copy_linear(source.fc1, target.fc1)
    _copy_linear(source.fc2, target.fc2)
    if target.relative_position:
        head_dim = target.rel_k_table.shape[1]
        target.rel_k_table.copy_(source.attn.rel_pos_embed_k.sliced_table(head_dim))
        target.rel_v_table.copy_(source.attn.rel_pos_embed_v.sliced_table(head_dim))


def save_subnet(subnet: SubnetViT, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.pth`` of ``subnet`` into ``directory``, replacing any earlier export.

    Both files are written into a temporary sibling folder, which is then renamed to
    ``directory``. An existing export is first renamed aside and deleted once the new one is in
    place. A process killed at any point therefore leaves the old or the new export complete at
    ``directory``, except when it is killed between the two renames: then ``directory`` is
    missing and both exports are complete in hidden ``.NAME.*`` siblings.

    Raises:
        FileExistsError: when ``directory`` is an existing file.
    """
    directory = Path(directory)
    # Replace the folder a symbolic link points to, so the link stays valid.
    target = directory.resolve() if directory.is_symlink() else directory
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{directory} is a file, not a subnet folder; pass another path or remove the file")
    target.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu() for key, value in subnet.state_dict().items()}
    text = json.dumps(subnet.config, indent=2) + "\n"

    temporary = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    old_export = None
    try:
        # mkdtemp creates the folder with mode 0700, so give it the mode that mkdir() would.
        os.chmod(temporary, 0o777 & ~_UMASK)
        _write_file(temporary / WEIGHTS_FILE, lambda handle: torch.save(state, handle))
        _write_file(temporary / CONFIG_FILE, lambda handle: handle.write(text.encode()))
        if target.exists():
            # rename() replaces an empty folder, so mkdtemp reserves a unique name for the old export.
            old_export = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
            os.rename(target, old_export)
        os.rename(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        if old_export is not None:
            if target.exists():
                shutil.rmtree(old_export, ignore_errors=True)
            else:
                os.rename(old_export, target)
        raise
    if old_export is not None:
        shutil.rmtree(old_export)
    return directory


def load_subnet(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> SubnetViT:
    """Rebuild a subnet written by :func:`save_subnet`; needs no supernet.

    Raises:
        FileNotFoundError: when ``config.json`` or ``model.pth`` is missing.
        ValueError: when the config is not a subnet config of a known format version, or the
            weights do not fit the config (missing, unexpected or differently shaped tensors).
    """
    directory = Path(directory)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found; an exported subnet directory contains {CONFIG_FILE} and {WEIGHTS_FILE}; export the subnet again")
    config = json.loads((directory / CONFIG_FILE).read_text())
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{directory / CONFIG_FILE} is not an exported subnet config of format version {FORMAT_VERSION}; "
            f"export it again with this version"
        )
    subnet = SubnetViT(config)
    state = torch.load(directory / WEIGHTS_FILE, map_location=map_location, weights_only=True)
    problems = _state_mismatch(subnet.state_dict(), state)
    if problems:
        raise ValueError(
            f"{directory / WEIGHTS_FILE} does not fit {directory / CONFIG_FILE} ({problems}); "
            f"export the subnet to {directory} again"
        )
    subnet.load_state_dict(state)
    return subnet.eval()


def _state_mismatch(expected: Mapping[str, torch.Tensor], state: object, max_listed: int = 4) -> str:
    """Describe how ``state`` differs from ``expected`` in keys and shapes, or return "" when it fits."""
    if not isinstance(state, Mapping):
        return f"the file contains a {type(state).__name__}, not a state dict"

    def names(keys: list[str]) -> str:
        more = f" and {len(keys) - max_listed} more" if len(keys) > max_listed else ""
        return ", ".join(keys[:max_listed]) + more

    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    wrong_shapes = []
    for key, tensor in expected.items():
        found = getattr(state.get(key), "shape", None)
        if key in state and found != tensor.shape:
            found = tuple(found) if found is not None else type(state[key]).__name__
            wrong_shapes.append(f"{key} is {found} in the file but {tuple(tensor.shape)} by the config")
    parts = []
    if missing:
        parts.append(f"missing keys: {names(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {names(unexpected)}")
    if wrong_shapes:
        parts.append(f"shapes differ: {names(wrong_shapes)}")
    return "; ".join(parts)


def _write_file(path: Path, write) -> None:
    with open(path, "wb") as stream:
        write(stream)
        stream.flush()
        os.fsync(stream.fileno())


def _read_umask() -> int:
    # os.umask can only be read by setting it. Reading it once, at import, keeps the moment when it
    # is 0 away from threads that create files later.
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _read_umask()

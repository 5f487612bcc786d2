"""The weight-entangled ViT supernet of AutoFormer and PreNAS.

One network contains the weights of the largest subnet, and a candidate dict picks a subnet, which then
runs on leading slices of those weights (see :mod:`model.layers`). Parameter names match the
released PreNAS supernet checkpoints, so their state dicts load as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from model.candidate import CandidateError, check_candidate, largest_candidate
from model.layers import AttentionSuper, LayerNormSuper, LinearSuper, PatchEmbedSuper, gelu_float32


class TransformerBlockSuper(nn.Module):
    """One encoder block: attention and MLP, each with a residual and a layer norm.

    Args:
        embed_dim: the supernet embed dim.
        num_heads: the supernet num heads.
        mlp_ratio: the supernet mlp ratio.
        qkv_bias, qk_scale, attn_drop, relative_position, max_relative_position, change_qkv:
            passed to :class:`~model.layers.AttentionSuper`.
        drop: dropout probability at the supernet embed dim; a subnet uses ``drop * e / E``.
        drop_path: stochastic-depth probability of this block.
        pre_norm: layer norm before each branch (True) or after each residual sum (False).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        pre_norm: bool = True,
        relative_position: bool = False,
        max_relative_position: int = 14,
        change_qkv: bool = False,
    ) -> None:
        super().__init__()
        self.super_embed_dim = embed_dim
        self.super_drop = drop
        self.pre_norm = pre_norm
        hidden = int(embed_dim * mlp_ratio)
        self.attn_layer_norm = LayerNormSuper(embed_dim)
        self.attn = AttentionSuper(
            embed_dim,
            num_heads,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            attn_drop=attn_drop,
            relative_position=relative_position,
            max_relative_position=max_relative_position,
            change_qkv=change_qkv,
        )
        self.ffn_layer_norm = LayerNormSuper(embed_dim)
        self.fc1 = LinearSuper(embed_dim, hidden)
        self.fc2 = LinearSuper(hidden, embed_dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.is_identity = False
        self.active_embed_dim = embed_dim

    def set_active(self, embed_dim: int, mlp_ratio: float, num_heads: int, out_dim: int) -> None:
        self.is_identity = False
        self.active_embed_dim = embed_dim
        hidden = int(embed_dim * mlp_ratio)
        self.attn_layer_norm.set_active(embed_dim)
        self.attn.set_active(embed_dim, num_heads)
        self.ffn_layer_norm.set_active(embed_dim)
        self.fc1.set_active(embed_dim, hidden)
        self.fc2.set_active(hidden, out_dim)

    def set_identity(self) -> None:
        self.is_identity = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_identity:
            return x
        drop = self.super_drop * self.active_embed_dim / self.super_embed_dim

        residual = x
        if self.pre_norm:
            x = self.attn_layer_norm(x)
        x = F.dropout(self.attn(x), drop, self.training)
        x = residual + self.drop_path(x)
        if not self.pre_norm:
            x = self.attn_layer_norm(x)

        residual = x
        if self.pre_norm:
            x = self.ffn_layer_norm(x)
        x = F.dropout(gelu_float32(self.fc1(x)), drop, self.training)
        x = F.dropout(self.fc2(x), drop, self.training)
        x = residual + self.drop_path(x)
        if not self.pre_norm:
            x = self.ffn_layer_norm(x)
        return x


class Supernet(nn.Module):
    """Weight-entangled ViT supernet.

    Args:
        img_size: input height and width in pixels.
        patch_size: patch height and width in pixels.
        in_chans: input channels.
        num_classes: classes of the head.
        embed_dim: supernet embed dim (the largest choice).
        depth: supernet depth, the number of blocks.
        num_heads: supernet num heads.
        mlp_ratio: supernet mlp ratio.
        qkv_bias: whether q/k/v have a bias.
        qk_scale: fixed attention scale; None for ``head_dim ** -0.5``.
        drop_rate: dropout at the supernet embed dim, scaled by ``e / embed_dim`` for a subnet.
        attn_drop_rate: attention-weight dropout, scaled likewise.
        drop_path_rate: stochastic depth of the last block; it grows linearly from 0 over the blocks.
        pre_norm: pre-norm blocks and a final layer norm (True in every released supernet).
        gp: classify the mean of the patch tokens instead of the cls token.
        relative_position: add 2D relative-position terms in every attention.
        change_qkv: 64-wide heads with a q/k/v width of ``64 * num_heads`` chosen per layer.
        max_relative_position: clip of relative distances in patches.
        abs_pos: add a learned absolute position embedding.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 256,
        depth: int = 14,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        pre_norm: bool = True,
        gp: bool = False,
        relative_position: bool = False,
        change_qkv: bool = False,
        max_relative_position: int = 14,
        abs_pos: bool = True,
    ) -> None:
        super().__init__()
        if change_qkv and 64 * num_heads > embed_dim:
            raise ValueError(
                f"with change_qkv the supernet embed dim must be at least 64 x num heads, "
                f"got embed_dim={embed_dim} and num_heads={num_heads}"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.super_embed_dim = embed_dim
        self.super_depth = depth
        self.super_num_heads = num_heads
        self.super_mlp_ratio = float(mlp_ratio)
        self.super_drop_rate = drop_rate
        self.pre_norm = pre_norm
        self.gp = gp
        self.relative_position = relative_position
        self.change_qkv = change_qkv
        self.max_relative_position = max_relative_position
        self.abs_pos = abs_pos

        self.patch_embed_super = PatchEmbedSuper(img_size, patch_size, in_chans, embed_dim)
        self.num_patches = self.patch_embed_super.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, embed_dim))
        drop_path_rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            TransformerBlockSuper(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=rate,
                pre_norm=pre_norm,
                relative_position=relative_position,
                max_relative_position=max_relative_position,
                change_qkv=change_qkv,
            )
            for rate in drop_path_rates
        )
        if pre_norm:
            self.norm = LayerNormSuper(embed_dim)
        self.head = LinearSuper(embed_dim, num_classes)

        self._init_weights()
        self.set_subnet(self.largest_candidate())

    def _init_weights(self) -> None:
        if self.abs_pos:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """Names of parameters that the optimizer keeps out of weight decay."""
        return {"pos_embed", "cls_token"}

    def largest_candidate(self) -> dict[str, Any]:
        return largest_candidate(self.super_embed_dim, self.super_depth, self.super_num_heads, self.super_mlp_ratio)

    def check_candidate(self, candidate: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``candidate`` against this supernet and return its normalised copy.

        Raises:
            CandidateError: naming the field, the value and the limit.
        """
        checked = check_candidate(
            candidate,
            embed_dim=self.super_embed_dim,
            depth=self.super_depth,
            num_heads=self.super_num_heads,
            mlp_ratio=self.super_mlp_ratio,
            change_qkv=self.change_qkv,
        )
        if self.relative_position and not self.change_qkv:
            # Without change_qkv the head dim is E / h, wider than the tables unless h is the maximum.
            narrower = [h for h in checked["num_heads"] if h != self.super_num_heads]
            if narrower:
                raise CandidateError(
                    f"candidate num_heads {narrower} differ from the supernet's {self.super_num_heads}; "
                    f"relative position without change_qkv only supports the supernet's num heads"
                )
        return checked

    def set_subnet(self, candidate: Mapping[str, Any]) -> None:
        """Make the supernet compute the subnet named by ``candidate`` until the next call."""
        candidate = self.check_candidate(candidate)
        depth = candidate["layer_num"]
        embed_dims = candidate["embed_dim"]
        out_dims = embed_dims[1:] + embed_dims[-1:]

        self.patch_embed_super.set_active(embed_dims[0])
        for index, block in enumerate(self.blocks):
            if index < depth:
                block.set_active(embed_dims[index], candidate["mlp_ratio"][index], candidate["num_heads"][index], out_dims[index])
            else:
                block.set_identity()
        if self.pre_norm:
            self.norm.set_active(embed_dims[-1])
        self.head.set_active(embed_dims[-1], self.num_classes)
        self._subnet = candidate

    # The name used by the AutoFormer and PreNAS code bases.
    set_sample_config = set_subnet

    @property
    def subnet(self) -> dict[str, Any]:
        """The active candidate (a copy)."""
        return dict(self._subnet)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        embed = self._subnet["embed_dim"][0]
        x = self.patch_embed_super(x)
        cls_token = self.cls_token[..., :embed].expand(x.shape[0], -1, -1)
        x = torch.cat((cls_token, x), dim=1)
        if self.abs_pos:
            x = x + self.pos_embed[..., :embed]
        x = F.dropout(x, self.super_drop_rate * embed / self.super_embed_dim, self.training)

        for block in self.blocks:
            x = block(x)
        if self.pre_norm:
            x = self.norm(x)
        return x[:, 1:].mean(dim=1) if self.gp else x[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def _resolve(self, candidate: Mapping[str, Any] | None) -> dict[str, Any]:
        return self._subnet if candidate is None else self.check_candidate(candidate)

    def num_params(self, candidate: Mapping[str, Any] | None = None) -> int:
        """Count the subnet's parameters with the rule of the PreNAS code, which its tables bin by.

        The count takes the sliced patch conv and, in every used block, the sliced qkv, proj, both
        layer norms, fc1, fc2 and relative-position tables. It adds the final norm, the whole head
        and ``embed_dim * (num_patches + 2)`` for the cls token and the position embedding, whether
        or not an absolute position embedding exists. ``candidate`` defaults to the active subnet.
        """
        candidate = self._resolve(candidate)
        embed = candidate["embed_dim"][0]
        bias = 1 if self.blocks[0].attn.qkv.bias is not None else 0
        patch_area = self.in_chans * self.patch_size**2
        total = embed * patch_area + embed
        for index in range(candidate["layer_num"]):
            width, hidden, out, head_dim = self._block_dims(candidate, index)
            total += 3 * width * embed + 3 * width * bias  # qkv
            total += embed * width + embed  # proj
            total += 4 * embed  # attention and ffn layer norms
            total += hidden * embed + hidden  # fc1
            total += out * hidden + out  # fc2
            if self.relative_position:
                total += 2 * 2 * (2 * self.max_relative_position + 2) * head_dim
        if self.pre_norm:
            total += 2 * embed
        total += self.num_classes * embed + self.num_classes
        return total + embed * (self.num_patches + 2)

    def _block_dims(self, candidate: Mapping[str, Any], index: int) -> tuple[int, int, int, int]:
        """Return (q/k/v width, hidden dim, output dim, head dim) of block ``index``."""
        embed_dims = candidate["embed_dim"]
        heads = candidate["num_heads"][index]
        width = 64 * heads if self.change_qkv else self.super_embed_dim
        hidden = int(embed_dims[index] * candidate["mlp_ratio"][index])
        out = embed_dims[index + 1] if index + 1 < candidate["layer_num"] else embed_dims[-1]
        return width, hidden, out, width // heads

    def flops(self, candidate: Mapping[str, Any] | None = None) -> float:
        """Return the complexity count of the PreNAS and AutoFormer code, the "FLOPs" of their tables.

        It is a multiply-accumulate estimate with the conventions of that code kept for
        comparability: blocks are counted for ``num_patches + 2`` tokens although they see
        ``num_patches + 1``, the head is counted once per token, and the relative-position and layer
        norm terms follow its formulas. Divide by 1e9 for the "G" of the published tables. See
        :meth:`macs` for an exact count.
        """
        candidate = self._resolve(candidate)
        embed = candidate["embed_dim"][0]
        patches = self.num_patches
        seq = patches + 2
        total = embed + patches * (self.in_chans * self.patch_size**2 * embed)
        total += (patches + 1) * embed / 2
        for index in range(candidate["layer_num"]):
            width, hidden, out, _ = self._block_dims(candidate, index)
            total += 2 * seq * embed
            total += seq * 3 * width * embed
            total += 2 * seq * seq * width
            total += seq * embed * width
            if self.relative_position:
                rel = self.max_relative_position
                total += (rel * seq * seq + seq * seq / 2) + (rel * seq * seq + seq * width / 2)
            total += seq * hidden * embed + seq * out * hidden
        total += (patches + 1) * self.num_classes * embed
        return float(total)

    def macs(self, candidate: Mapping[str, Any] | None = None) -> int:
        """Count the multiply-accumulates of the subnet's forward pass for one image.

        Counted: the patch conv, and in every used block the qkv, q.k, attention-weighted sum, proj,
        fc1 and fc2 for all ``num_patches + 1`` tokens. Each of the two relative-position terms of an
        attention counts as a dense product with one head-dim vector per token pair. The head counts
        once.
        Not counted: layer norms, softmax, GELU, additions and the mean pooling.
        """
        candidate = self._resolve(candidate)
        embed = candidate["embed_dim"][0]
        tokens = self.num_patches + 1
        total = self.num_patches * self.in_chans * self.patch_size**2 * embed
        for index in range(candidate["layer_num"]):
            width, hidden, out, _ = self._block_dims(candidate, index)
            total += tokens * 3 * width * embed
            total += 2 * tokens * tokens * width
            if self.relative_position:
                total += 2 * tokens * tokens * width
            total += tokens * width * embed
            total += tokens * hidden * embed + tokens * out * hidden
        return total + self.num_classes * candidate["embed_dim"][-1]

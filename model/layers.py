"""Weight-entangled layers of the ViT supernet and the functional ops they share with exported subnets.

Every super layer contains the weights of its largest choice and uses leading slices of them. The
active sizes are plain ints set by the supernet, and the slices are taken inside ``forward``, so a
layer keeps working and keeps sharing its storage after ``.to()``, a device move or ``copy.deepcopy``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# q/k/v row layouts of a qkv weight. "interleaved": row 3*j + t is column j of q (t=0), k (t=1)
# or v (t=2), as in the released supernet checkpoints trained with change_qkv. "grouped": the
# rows are all q, then all k, then all v, as in a plain ViT.
QKV_INTERLEAVED = "interleaved"
QKV_GROUPED = "grouped"


def gelu_float32(x: torch.Tensor) -> torch.Tensor:
    """GELU computed in float32 and cast back, so that half-precision runs match fp32 closely."""
    return F.gelu(x.float()).type_as(x)


def relative_position_index(num_tokens: int, max_relative_position: int, device=None) -> torch.Tensor:
    """Build, for every token, its index into the relative-position tables per key row and column.

    Tokens are a cls token followed by a square grid of ``num_tokens - 1`` patches in row-major
    order. A pair's embedding is ``table_v[vertical] + table_h[horizontal]``. The vertical distance
    from a patch to grid row r, and its horizontal distance to grid column c, are clipped to
    ``[-max_relative_position, max_relative_position]`` and shifted by ``max_relative_position + 1``.
    Index 0 is kept for every pair that involves the cls token. So the N x N pairs are described
    by per-row and per-column indices.

    Returns:
        A long tensor of shape (2, num_tokens, grid + 1). Row 0 indexes the vertical table and row 1
        the horizontal table, offset by the table length ``2 * max_relative_position + 2`` so that
        both address one concatenated [vertical; horizontal] table. Column 0 is the cls key, and
        column 1 + r is grid row r (vertical) or grid column r (horizontal).
    """
    num_patches = num_tokens - 1
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"relative position needs a square grid of patches, got {num_patches} patches")
    table_length = 2 * max_relative_position + 2
    coordinate = torch.arange(grid, device=device)
    positions = torch.arange(num_patches, device=device)

    def clipped(token_coordinate: torch.Tensor) -> torch.Tensor:
        distance = coordinate[None, :] - token_coordinate[:, None]
        distance = distance.clamp(-max_relative_position, max_relative_position) + max_relative_position + 1
        return F.pad(distance, (1, 0, 1, 0), value=0)

    return torch.stack([clipped(positions // grid), clipped(positions % grid) + table_length])


def _key_grid_features(tokens: int, grid: int, dtype: torch.dtype, device) -> torch.Tensor:
    """One-hot grid row and grid column of each key, (N, 2 * (grid + 1)); slot 0 of each half is the cls key."""
    positions = torch.arange(tokens - 1, device=device)
    cls = positions.new_zeros(1)
    rows = torch.cat([cls, 1 + positions // grid])
    columns = torch.cat([cls, 1 + positions % grid])
    return torch.cat([F.one_hot(rows, grid + 1), F.one_hot(columns, grid + 1)], dim=-1).to(dtype)


def _token_tables(table: torch.Tensor, rel_index: torch.Tensor) -> torch.Tensor:
    """Gather the table rows that each token uses, as (N, 2 * (grid + 1), head_dim).

    For each token: its vertical rows per grid row, then its horizontal rows per grid column.
    """
    tokens = rel_index.shape[1]
    return table[rel_index].permute(1, 0, 2, 3).reshape(tokens, -1, table.shape[-1])


def _relative_attention(q, k, v, rel_k_table, rel_v_table, rel_index, dropout, fused):
    """Compute attention with 2D relative-position terms in its logits and outputs.

    Takes q (already multiplied by the attention scale), k and v of shape (B, heads, N, head_dim)
    and returns (B, N, heads, head_dim).

    A pair's embedding is a row-distance plus a column-distance embedding, so both terms factor
    through the short tables. The key term of query i and key j is ``s_i[row_j] + t_i[col_j]``,
    where ``s_i`` and ``t_i`` are the scores of q_i against the table rows that token i uses
    per grid row and column: appending ``[s_i, t_i]`` to q_i and a one-hot grid row and column
    to k_j adds it to the logits. Appending the same one-hot to v_j makes the attention output
    carry the weight that each query puts on every grid row and column, which then meets the
    value tables. So one attention over the widened heads does all N x N work, and no
    (N, N, head_dim) tensor exists.

    ``fused`` runs that attention through ``F.scaled_dot_product_attention``, which never holds the
    N x N weights. Otherwise two batched matrix products and a softmax compute it: on the 2-core
    test machine that was about 1.2x faster than the fused kernel in both eval and training (an
    estimate from one CPU model, see docs/benchmarks.md). Both paths zero-pad the widened head to
    a multiple of 8 columns.
    """
    batch, heads, tokens, head_dim = q.shape
    grid = rel_index.shape[-1] - 1
    features = _key_grid_features(tokens, grid, q.dtype, q.device)
    width = head_dim + features.shape[-1]
    # The fused GPU kernels take head dims that are multiples of 8. On the 2-core test machine,
    # 96 instead of 94 columns also made the product with v about 15 % faster (one measurement).
    # TODO: the fused path, padding included, is only tested on the CPU against a dense reference;
    # it has not run on a GPU yet.
    padding = -width % 8
    # No branch on the padding: under torch.jit.trace it is a traced value, not a Python int.
    features = F.pad(features, (0, padding)).expand(batch, heads, tokens, -1)

    # Token i uses the 2 * (grid + 1) table rows rel_index[:, i], so its scores are one small
    # product per token over all images and heads. On the 2-core test machine that took half the
    # time of scoring q against the whole table and then gathering.
    key_tables = _token_tables(rel_k_table, rel_index)
    q_tokens = q.permute(2, 0, 1, 3).reshape(tokens, batch * heads, head_dim)
    q_table = torch.bmm(q_tokens, key_tables.transpose(1, 2)).view(tokens, batch, heads, -1).permute(1, 2, 0, 3)
    q = torch.cat([q, q_table, q.new_zeros(batch, heads, tokens, padding)], dim=-1)
    v = torch.cat([v, features], dim=-1)
    if fused:
        out = F.scaled_dot_product_attention(q, torch.cat([k, features], dim=-1), v, dropout_p=dropout, scale=1.0)
    else:
        # Keys are laid out transposed: that operand order made the batched product about 20 % faster
        # on the 2-core test machine.
        k = torch.cat([k.transpose(-2, -1), features.transpose(-2, -1)], dim=-2)
        weights = torch.softmax(q @ k, dim=-1)
        if dropout > 0.0:
            weights = F.dropout(weights, dropout)
        out = weights @ v
    out, table_weights = out[..., :head_dim], out[..., head_dim:width]

    # Token i weights grid row r with table row rel_index[0, i, r], so the value term of token i is
    # its row and column weights times the table rows it uses: one small product per token.
    table_weights = table_weights.permute(2, 0, 1, 3).reshape(tokens, batch * heads, 2 * (grid + 1))
    value_term = torch.bmm(table_weights, _token_tables(rel_v_table, rel_index)).view(tokens, batch, heads, head_dim)
    return out.transpose(1, 2) + value_term.transpose(0, 1)


def _grouped_qkv(weight, bias, layout, scale):
    """Reorder the rows of a qkv weight and bias into q, k, v blocks, with q times ``scale``.

    Returns the (3, width, in_dim) weight and the (3, width) bias or None. The copy is small next
    to the activations. It gives q, k and v views whose head dim is contiguous, and it saves the
    pass over q that scaling would take. With 64-wide heads the scale is a power of two, so the
    scaled weights give bit-identical q.
    """
    width = weight.shape[0] // 3
    if layout == QKV_INTERLEAVED:
        blocks = weight.view(width, 3, -1).transpose(0, 1)
        bias_blocks = None if bias is None else bias.view(width, 3).transpose(0, 1)
    else:
        blocks = weight.view(3, width, -1)
        bias_blocks = None if bias is None else bias.view(3, width)
    factor = weight.new_tensor([scale, 1.0, 1.0])
    weight = blocks * factor[:, None, None]
    bias = None if bias_blocks is None else bias_blocks * factor[:, None]
    return weight, bias


def attention(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    num_heads: int,
    scale: float,
    qkv_layout: str = QKV_INTERLEAVED,
    rel_k_table: torch.Tensor | None = None,
    rel_v_table: torch.Tensor | None = None,
    rel_index: torch.Tensor | None = None,
    attn_drop: float = 0.0,
    training: bool = False,
    fused: bool | None = None,
) -> torch.Tensor:
    """Multi-head self-attention with optional 2D relative position, on already sliced weights.

    Args:
        x: tokens, (B, N, in_dim).
        qkv_weight, qkv_bias: (3 * width, in_dim) and (3 * width,), rows in ``qkv_layout`` order.
        proj_weight, proj_bias: (out_dim, width) and (out_dim,).
        num_heads: heads; the head dim is ``width / num_heads``.
        scale: factor applied to q.k and to the relative-position logits.
        rel_k_table, rel_v_table: concatenated [vertical; horizontal] tables of shape
            (2 * table_length, head_dim) for the key and value terms, or None for no relative position.
        rel_index: the (2, N, grid + 1) index from :func:`relative_position_index`.
        attn_drop: dropout probability on the attention weights.
        fused: how relative-position attention runs (see :func:`_relative_attention`); None picks
            the fused kernel everywhere except on the CPU. Without relative position it is always fused.
    """
    batch, tokens, _ = x.shape
    width = qkv_weight.shape[0] // 3
    head_dim = width // num_heads
    dropout = attn_drop if training else 0.0

    qkv_weight, qkv_bias = _grouped_qkv(qkv_weight, qkv_bias, qkv_layout, scale)
    # The biases are applied where they cost least. The k bias adds q_i.b_k to every logit of
    # query i, which softmax cancels, so it is left out. Each query's attention weights sum to 1,
    # so the v bias passes through unchanged and joins the proj bias, unless dropout on the
    # weights breaks that sum. Only q gets its bias, in the pass that makes q contiguous.
    qkv = F.linear(x, qkv_weight.reshape(3 * width, -1)).view(batch, tokens, 3, num_heads, head_dim)
    q, k, v = qkv.unbind(2)
    if qkv_bias is not None:
        q = q + qkv_bias[0].to(q.dtype).view(num_heads, head_dim)
        if dropout > 0.0:
            v = v + qkv_bias[2].to(v.dtype).view(num_heads, head_dim)
        else:
            v_term = F.linear(qkv_bias[2], proj_weight)
            proj_bias = v_term if proj_bias is None else proj_bias + v_term
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    if rel_k_table is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=1.0).transpose(1, 2)
    else:
        if fused is None:
            fused = x.device.type != "cpu"
        out = _relative_attention(q, k, v, rel_k_table, rel_v_table, rel_index, dropout, fused)

    out = out.reshape(batch, tokens, width)
    return F.linear(out, proj_weight, proj_bias)


class LinearSuper(nn.Linear):
    """A linear layer that uses ``weight[:out_features, :in_features]`` of its largest shape."""

    def __init__(self, super_in_dim: int, super_out_dim: int, bias: bool = True) -> None:
        super().__init__(super_in_dim, super_out_dim, bias=bias)
        self.active_in = super_in_dim
        self.active_out = super_out_dim

    def set_active(self, in_dim: int, out_dim: int) -> None:
        self.active_in, self.active_out = in_dim, out_dim

    def sliced_weight(self) -> torch.Tensor:
        return self.weight[: self.active_out, : self.active_in]

    def sliced_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias[: self.active_out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.sliced_weight(), self.sliced_bias())


class LayerNormSuper(nn.LayerNorm):
    """A layer norm over the first ``active_dim`` channels, eps 1e-5 as in the released supernets."""

    def __init__(self, super_dim: int, eps: float = 1e-5) -> None:
        super().__init__(super_dim, eps=eps)
        self.active_dim = super_dim

    def set_active(self, dim: int) -> None:
        self.active_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.active_dim
        return F.layer_norm(x, (dim,), self.weight[:dim], self.bias[:dim], self.eps)


class PatchEmbedSuper(nn.Module):
    """Non-overlapping patch embedding whose conv uses the first ``active_dim`` output channels.

    Args:
        img_size: input height and width.
        patch_size: patch height and width (the conv stride).
        in_chans: input channels.
        embed_dim: the supernet embed dim.
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.active_dim = embed_dim

    def set_active(self, dim: int) -> None:
        self.active_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"input is {tuple(x.shape[-2:])} pixels but the supernet was built for "
                f"{self.img_size}x{self.img_size}; resize the input or set the input size to match"
            )
        dim = self.active_dim
        x = F.conv2d(x, self.proj.weight[:dim], self.proj.bias[:dim], stride=self.patch_size)
        return x.flatten(2).transpose(1, 2)


class RelativePosition2DSuper(nn.Module):
    """Vertical and horizontal relative-position tables, (2 * max_rel + 2, head_dim) each.

    Args:
        head_dim: the largest head dim.
        max_relative_position: distances are clipped to this many patches.
    """

    def __init__(self, head_dim: int, max_relative_position: int) -> None:
        super().__init__()
        rows = 2 * max_relative_position + 2
        self.max_relative_position = max_relative_position
        self.embeddings_table_v = nn.Parameter(torch.zeros(rows, head_dim))
        self.embeddings_table_h = nn.Parameter(torch.zeros(rows, head_dim))
        nn.init.trunc_normal_(self.embeddings_table_v, std=0.02)
        nn.init.trunc_normal_(self.embeddings_table_h, std=0.02)

    def sliced_table(self, head_dim: int) -> torch.Tensor:
        """Return [vertical; horizontal] tables sliced to ``head_dim`` columns, one tensor."""
        return torch.cat([self.embeddings_table_v[:, :head_dim], self.embeddings_table_h[:, :head_dim]])


class AttentionSuper(nn.Module):
    """Self-attention whose q/k/v width, head count and input dim are chosen per subnet.

    With ``change_qkv`` every head is 64 wide, the q/k/v width is ``64 * num_heads`` and the qkv
    rows are interleaved (see :data:`QKV_INTERLEAVED`). Without it, the q/k/v width is always the
    supernet embed dim and the head dim is ``embed_dim / num_heads``.

    Args:
        embed_dim: the supernet embed dim.
        num_heads: the supernet num heads.
        qkv_bias: whether q/k/v have a bias.
        qk_scale: fixed attention scale; None for ``head_dim ** -0.5`` of the active subnet.
        attn_drop: attention-weight dropout at the supernet embed dim.
        relative_position: whether to add 2D relative-position terms to keys and values.
        max_relative_position: distance clip of the relative-position tables.
        change_qkv: see above.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        relative_position: bool = False,
        max_relative_position: int = 14,
        change_qkv: bool = False,
    ) -> None:
        super().__init__()
        self.super_embed_dim = embed_dim
        self.change_qkv = change_qkv
        self.qk_scale = qk_scale
        self.super_attn_drop = attn_drop
        self.qkv_layout = QKV_INTERLEAVED if change_qkv else QKV_GROUPED
        qkv_width = 64 * num_heads if change_qkv else embed_dim
        self.qkv = LinearSuper(embed_dim, 3 * qkv_width, bias=qkv_bias)
        self.proj = LinearSuper(qkv_width, embed_dim)
        self.relative_position = relative_position
        self.max_relative_position = max_relative_position
        if relative_position:
            self.rel_pos_embed_k = RelativePosition2DSuper(embed_dim // num_heads, max_relative_position)
            self.rel_pos_embed_v = RelativePosition2DSuper(embed_dim // num_heads, max_relative_position)
        self._rel_index_cache: dict[tuple[int, str], torch.Tensor] = {}
        self.set_active(embed_dim, num_heads)

    def set_active(self, embed_dim: int, num_heads: int) -> None:
        self.active_embed_dim = embed_dim
        self.active_num_heads = num_heads
        self.active_width = 64 * num_heads if self.change_qkv else self.super_embed_dim
        self.qkv.set_active(embed_dim, 3 * self.active_width)
        self.proj.set_active(self.active_width, embed_dim)

    def rel_index(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        key = (num_tokens, str(device))
        if key not in self._rel_index_cache:
            # A tensor made under inference mode could not be used by a later training step.
            with torch.inference_mode(False):
                self._rel_index_cache[key] = relative_position_index(num_tokens, self.max_relative_position, device)
        return self._rel_index_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = self.active_num_heads
        head_dim = self.active_width // heads
        scale = self.qk_scale if self.qk_scale is not None else head_dim**-0.5
        attn_drop = self.super_attn_drop * self.active_embed_dim / self.super_embed_dim
        rel_k = rel_v = rel_index = None
        if self.relative_position:
            rel_k = self.rel_pos_embed_k.sliced_table(head_dim)
            rel_v = self.rel_pos_embed_v.sliced_table(head_dim)
            rel_index = self.rel_index(x.shape[1], x.device)
        return attention(
            x,
            self.qkv.sliced_weight(),
            self.qkv.sliced_bias(),
            self.proj.sliced_weight(),
            self.proj.sliced_bias(),
            heads,
            scale,
            self.qkv_layout,
            rel_k,
            rel_v,
            rel_index,
            attn_drop,
            self.training,
        )

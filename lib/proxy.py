"""The zero-cost proxy of PreNAS: one gradient at the largest subnet, then vectorised subnet scores.

The gradient is taken once, with the largest subnet of the search space active. A subnet's proxy
score sums an element value of the weights it uses, for example ``|theta * grad|``. A subnet uses
leading slices, so each weight contributes a prefix sum. This module precomputes, per layer and
embed dim, cumulative sums over the q/k/v width and over the mlp hidden width. The score of a
candidate is then a sum of table lookups, and a whole search space scores in milliseconds.

The reference's "left_super" rule sets which parameters count. They are the patch conv, the final
norm and the head (its weight sliced to the embed dim, its bias whole). Per used block they are
qkv, proj, both layer norms, fc1 and fc2, each sliced as the subnet's forward pass slices it. The
cls token, the position embedding and the relative-position tables do not count.

NOTE: the reference code differs in two details. It counts only the first embed-dim entries of the
head bias, and it reports the square root of the ``left_super_taylor9`` sum. The square root keeps
the ranking. At initialisation the head bias is zero, so its slice changes no ``taylor6``,
``taylor5`` or ``l1norm`` score. It does change ``taylor9`` scores, and any score with
``--resume``, by an amount that depends on the embed dim.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lib.distributed import all_reduce_sum
from lib.progress import ProgressLog, loop_length
from lib.search import BlockScores, CandidateBatch

logger = logging.getLogger(__name__)

# Element values summed over a subnet's weights; "params" (the parameter count) is not a sum of
# element values and is scored by the caller.
SCORE_METHODS = ("left_super_taylor6", "left_super_taylor5", "left_super_taylor9", "left_super_l1norm", "params")
BLOCK_SCORE_METHODS = ("balance_taylor6_max_dim", "balance_taylor6", "taylor6", "deeper_is_better")

# ImageNet channel statistics of the data-free batch.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ProxyError(ValueError):
    """An unknown proxy or block score method, or a candidate that the score tables cannot hold."""


def needs_gradient(score_method: str, block_score_methods: Iterable[str]) -> bool:
    """Return whether any of the methods reads the gradient."""
    check_score_method(score_method)
    methods = list(block_score_methods)
    for method in methods:
        check_block_score_method(method)
    return score_method not in ("left_super_l1norm", "params") or any(m != "deeper_is_better" for m in methods)


def check_score_method(method: str) -> None:
    if method not in SCORE_METHODS:
        raise ProxyError(f"unknown score method {method!r}; choose one of {', '.join(SCORE_METHODS)}")


def check_block_score_method(method: str) -> None:
    if method not in BLOCK_SCORE_METHODS:
        raise ProxyError(f"unknown block score method {method!r}; choose one of {', '.join(BLOCK_SCORE_METHODS)}")


# ---------------------------------------------------------------------------------------------
# Gradient


def data_free_batch(batch_size: int, input_size: int, seed: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Draw this process's share of the data-free batch.

    The whole batch of ``batch_size`` images comes from a generator seeded by ``seed`` alone, with
    channel c drawn from N(mean_c, std_c) of the ImageNet statistics. Each process takes a
    contiguous slice, so the processes together see the same batch for any number of processes.
    """
    if batch_size < world_size:
        raise ProxyError(
            f"the data-free batch of {batch_size} images cannot be split across {world_size} processes; "
            f"raise --batch-size to at least {world_size}"
        )
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, input_size, input_size, generator=generator)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images = images * std + mean
    return images.tensor_split(world_size)[rank]


def _collect_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: parameter.grad.detach().clone() if parameter.grad is not None else torch.zeros_like(parameter)
        for name, parameter in model.named_parameters()
    }


def _all_reduce_gradients(gradients: dict[str, torch.Tensor]) -> None:
    """Sum every gradient over the processes with one collective."""
    names = list(gradients)
    flat = torch.cat([gradients[name].reshape(-1) for name in names])
    all_reduce_sum(flat)
    offset = 0
    for name in names:
        size = gradients[name].numel()
        gradients[name] = flat[offset:offset + size].view_as(gradients[name])
        offset += size


class _LargestSubnetGradient:
    """Context that activates ``candidate``, turns off dropout and drop path, and clears gradients.

    The supernet has no batch norm, so eval mode only turns off dropout and drop path. That makes
    the gradient independent of the number of processes and of random state. The previous subnet,
    training mode and gradients of the model are restored on exit.
    """

    def __init__(self, model: nn.Module, candidate: Mapping) -> None:
        self.model = model
        self.candidate = candidate

    def __enter__(self) -> nn.Module:
        self.previous_subnet = self.model.subnet
        self.was_training = self.model.training
        self.model.set_subnet(self.candidate)
        self.model.eval()
        self.model.zero_grad(set_to_none=True)
        return self.model

    def __exit__(self, *exc_info) -> None:
        self.model.zero_grad(set_to_none=True)
        self.model.set_subnet(self.previous_subnet)
        self.model.train(self.was_training)


def data_free_gradient(
    model: nn.Module,
    candidate: Mapping,
    *,
    batch_size: int = 64,
    input_size: int = 224,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Return the gradient of the sum of all logits over the data-free batch, by parameter name.

    Each process runs its slice of the batch (see :func:`data_free_batch`) and the gradients are
    summed over the processes, which gives the gradient of the whole batch.
    """
    images = data_free_batch(batch_size, input_size, seed, rank, world_size).to(device)
    with _LargestSubnetGradient(model, candidate):
        model(images).sum().backward()
        gradients = _collect_gradients(model)
    _all_reduce_gradients(gradients)
    return gradients


def data_gradient(
    model: nn.Module,
    candidate: Mapping,
    loader: Iterable,
    *,
    max_batches: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Return the mean, over batches and processes, of the gradient of the cross-entropy loss.

    Args:
        model: the supernet.
        candidate: the subnet to take the gradient at (the largest subnet of the search space).
        loader: this process's batches of (images, labels).
        max_batches: batches per process; 0 takes the whole loader.
        device: where the model lives.
    """
    batches = 0
    total = loop_length(loader)
    if max_batches:
        total = max_batches if total is None else min(total, max_batches)
    progress = ProgressLog(logger, "proxy gradient", total)
    with _LargestSubnetGradient(model, candidate):
        for images, labels in loader:
            if max_batches and batches >= max_batches:
                break
            logits = model(images.to(device, non_blocking=True))
            F.cross_entropy(logits, labels.to(device, non_blocking=True)).backward()
            batches += 1
            progress.update(images.shape[0])
        gradients = _collect_gradients(model)

    _all_reduce_gradients(gradients)
    total = all_reduce_sum(torch.tensor([float(batches)], device=device)).item()
    if total == 0:
        raise ProxyError("the training set gave no batch for the proxy gradient; check --data-path and --batch-size")
    logger.info("proxy gradient: mean over %d batch(es)", int(total))
    return {name: gradient / total for name, gradient in gradients.items()}


# ---------------------------------------------------------------------------------------------
# Subnet scores


def element_values(method: str, weight: torch.Tensor, gradient: torch.Tensor | None) -> torch.Tensor:
    """Return the per-element value that ``method`` sums, in float64."""
    weight = weight.detach().to(torch.float64)
    if method == "left_super_l1norm":
        return weight.abs()
    if gradient is None:
        raise ProxyError(f"score method {method!r} needs the proxy gradient")
    gradient = gradient.detach().to(torch.float64)
    if method == "left_super_taylor6":
        return (weight * gradient).abs()
    if method == "left_super_taylor5":
        return weight * gradient
    if method == "left_super_taylor9":
        return gradient.abs()
    summing = ", ".join(SCORE_METHODS[:4])
    raise ProxyError(f"score method {method!r} is not a sum of element values; choose one of {summing}")


def _prefix_sums(values: torch.Tensor) -> torch.Tensor:
    """Cumulative sums along the last axis with a leading 0, so ``result[..., n]`` sums the first n."""
    return F.pad(values.cumsum(-1), (1, 0))


@dataclass
class _EmbedTables:
    """Score tables of one embed dim: ``total = base + constant[d] + sum_i attention[i, w_i] + mlp[i, m_i]``."""

    base: float
    constant: np.ndarray  # (D + 1,) prefix sums over layers of the width-independent block parts
    attention: np.ndarray  # (D, W + 1) by q/k/v width
    mlp: np.ndarray  # (D, M + 1) by hidden width


class SubnetScorer:
    """Vectorised proxy scores of candidates of one supernet.

    Args:
        parameters: the supernet's parameters by state-dict name.
        gradients: the proxy gradient by the same names; None for ``left_super_l1norm``.
        method: one of the summing score methods (not ``params``).
        depth: the supernet depth.
        head_dim: width of one head (64 with ``change_qkv``).
        embed_dims: embed dims to build score tables for now; tables for other embed dims are
            built when a candidate first needs them.
    """

    def __init__(
        self,
        parameters: Mapping[str, torch.Tensor],
        gradients: Mapping[str, torch.Tensor] | None,
        method: str,
        *,
        depth: int,
        head_dim: int = 64,
        embed_dims: Iterable[int] = (),
    ) -> None:
        check_score_method(method)
        if method == "params":
            raise ProxyError("score method 'params' is the parameter count; score it with the cost model instead")
        self.parameters = parameters
        self.gradients = gradients
        self.method = method
        self.depth = depth
        self.head_dim = head_dim
        self.super_embed_dim = parameters["patch_embed_super.proj.weight"].shape[0]
        self.super_hidden = parameters["blocks.0.fc1.weight"].shape[0]
        self.super_width = parameters["blocks.0.attn.qkv.weight"].shape[0] // 3
        self._tables: dict[int, _EmbedTables] = {}
        self._add_tables(sorted(set(embed_dims)))

    def _values(self, name: str) -> torch.Tensor:
        gradient = None if self.gradients is None else self.gradients[name]
        return element_values(self.method, self.parameters[name], gradient).cpu()

    def _add_tables(self, embeds: list[int]) -> None:
        """Build the score tables of ``embeds``, reading each parameter once for all of them."""
        if not embeds:
            return
        for embed in embeds:
            if not 1 <= embed <= self.super_embed_dim:
                raise ProxyError(f"embed dim {embed} is outside the supernet's range 1..{self.super_embed_dim}")
        # Index e - 1 of a cumulative sum over the embed axis sums the first e entries.
        last = torch.tensor(embeds) - 1

        def leading(name: str) -> torch.Tensor:
            """(n_embeds,) sums over the first e entries of the leading axis."""
            values = self._values(name)
            return values.reshape(values.shape[0], -1).sum(1).cumsum(0)[last]

        base = leading("patch_embed_super.proj.weight") + leading("patch_embed_super.proj.bias")
        base += leading("norm.weight") + leading("norm.bias")
        base += self._values("head.weight").sum(0).cumsum(0)[last] + self._values("head.bias").sum()

        constant = torch.zeros(len(embeds), self.depth + 1, dtype=torch.float64)
        attention = torch.zeros(len(embeds), self.depth, self.super_width + 1, dtype=torch.float64)
        mlp = torch.zeros(len(embeds), self.depth, self.super_hidden + 1, dtype=torch.float64)
        for layer in range(self.depth):
            prefix = f"blocks.{layer}."
            block_constant = sum(
                leading(prefix + name)
                for name in ("attn.proj.bias", "attn_layer_norm.weight", "attn_layer_norm.bias",
                             "ffn_layer_norm.weight", "ffn_layer_norm.bias", "fc2.bias")
            )
            constant[:, layer + 1] = constant[:, layer] + block_constant

            # Row 3*j + t of qkv is column j of q (t=0), k (t=1) or v (t=2), so width w uses j < w.
            qkv_weight = self._values(prefix + "attn.qkv.weight").cumsum(1)[:, last]
            qkv_weight = qkv_weight.view(-1, 3, len(embeds)).sum(1).T
            qkv_bias = self._values(prefix + "attn.qkv.bias").view(-1, 3).sum(1)
            proj_weight = self._values(prefix + "attn.proj.weight").cumsum(0)[last, :]
            attention[:, layer] = _prefix_sums(qkv_weight + qkv_bias + proj_weight)

            fc1 = self._values(prefix + "fc1.weight").cumsum(1)[:, last].T + self._values(prefix + "fc1.bias")
            fc2 = self._values(prefix + "fc2.weight").cumsum(0)[last, :]
            mlp[:, layer] = _prefix_sums(fc1 + fc2)

        for index, embed in enumerate(embeds):
            self._tables[embed] = _EmbedTables(float(base[index]), constant[index].numpy(),
                                               attention[index].numpy(), mlp[index].numpy())

    def tables(self, embed: int) -> _EmbedTables:
        if embed not in self._tables:
            self._add_tables([embed])
        return self._tables[embed]

    def score(self, batch: CandidateBatch) -> np.ndarray:
        """Return the proxy score of every candidate in ``batch``, as float64."""
        layers = batch.num_heads.shape[1]
        if layers > self.depth or (len(batch) and batch.depth.max() > self.depth):
            raise ProxyError(f"a candidate is deeper than the supernet's {self.depth} layers")
        widths = self.head_dim * batch.num_heads
        if widths.size and widths.max() > self.super_width:
            raise ProxyError(
                f"num heads {int(batch.num_heads.max())} needs q/k/v width {int(widths.max())}, "
                f"above the supernet's {self.super_width}"
            )

        scores = np.empty(len(batch), dtype=np.float64)
        layer_index = np.arange(layers)[None, :]
        embeds = [int(embed) for embed in np.unique(batch.embed_dim)]
        self._add_tables([embed for embed in embeds if embed not in self._tables])
        for embed in embeds:
            rows = np.flatnonzero(batch.embed_dim == embed)
            tables = self.tables(int(embed))
            # Layers beyond a candidate's depth have 0 heads and ratio 0, which index the leading 0.
            hidden = np.floor(int(embed) * batch.mlp_ratio[rows]).astype(np.int64)
            if hidden.size and hidden.max() > self.super_hidden:
                raise ProxyError(f"mlp hidden width {int(hidden.max())} is above the supernet's {self.super_hidden}")
            per_layer = tables.attention[layer_index, widths[rows]] + tables.mlp[layer_index, hidden]
            scores[rows] = tables.base + tables.constant[batch.depth[rows]] + per_layer.sum(axis=1)

        if self.method == "left_super_taylor5":
            scores = np.abs(scores)
        return scores


# ---------------------------------------------------------------------------------------------
# Block scores for the reallocation


def _block_element_scores(method: str, weight: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """Per-element block score on a weight restricted to the largest embed dim of the space."""
    weight = weight.detach().to(torch.float64).cpu()
    gradient = gradient.detach().to(torch.float64).cpu()
    scores = (weight * gradient).abs()
    if method == "taylor6":
        return scores
    # "balance": normalise by the matrix's sums of |theta| and |grad|, so that every block weighs the same.
    denominator = weight.abs().sum() * gradient.abs().sum()
    return scores / denominator if denominator > 0 else torch.zeros_like(scores)


def _table_embeds(method: str, embed_dims: list[int]) -> list[int]:
    """Return the embed dims whose columns the block scores of ``method`` read."""
    return [max(embed_dims)] if method.endswith("_max_dim") else embed_dims


def head_block_scores(
    parameters: Mapping[str, torch.Tensor],
    gradients: Mapping[str, torch.Tensor] | None,
    method: str,
    *,
    embed_dims: Iterable[int],
    num_heads: Iterable[int],
    depth: int,
    head_dim: int = 64,
) -> BlockScores | None:
    """Return, per (embed dim, heads choice), the per-layer score of raising a layer to that choice.

    Raising a layer from the next smaller choice h to h' scores ``|sum|`` of the block element
    scores over the q, k and v rows of heads h..h'-1. The columns go up to the embed dim, or up to
    the largest embed dim of the space for ``*_max_dim``. Returns None for ``deeper_is_better``.
    """
    check_block_score_method(method)
    if method == "deeper_is_better":
        return None
    embed_dims = sorted(embed_dims)
    choices = sorted(num_heads)
    max_dim = max(embed_dims)
    if gradients is None:
        raise ProxyError(f"block score method {method!r} needs the proxy gradient")

    table_embeds = _table_embeds(method, embed_dims)
    scores: dict[tuple[int, float], np.ndarray] = {}
    prefix_by_layer = []
    for layer in range(depth):
        name = f"blocks.{layer}.attn.qkv.weight"
        elements = _block_element_scores(method, parameters[name][:, :max_dim], gradients[name][:, :max_dim])
        # Per embed dim, the prefix sums over q/k/v columns j of the rows 3*j + t.
        prefix_by_layer.append({
            embed: _prefix_sums(elements[:, :embed].sum(1).view(-1, 3).sum(1)).numpy() for embed in table_embeds
        })

    for embed in embed_dims:
        table_embed = max_dim if method.endswith("_max_dim") else embed
        for lower, upper in zip(choices, choices[1:]):
            scores[(embed, upper)] = np.array([
                abs(prefix[table_embed][head_dim * upper] - prefix[table_embed][head_dim * lower])
                for prefix in prefix_by_layer
            ])
    return scores


def mlp_block_scores(
    parameters: Mapping[str, torch.Tensor],
    gradients: Mapping[str, torch.Tensor] | None,
    method: str,
    *,
    embed_dims: Iterable[int],
    mlp_ratios: Iterable[float],
    depth: int,
) -> BlockScores | None:
    """Return, per (embed dim, mlp ratio choice), the per-layer score of raising a layer to that choice.

    Raising a layer from ratio r to r' at embed dim e scores ``|sum|`` of the block element scores
    over fc1 rows ``int(e*r) .. int(e*r')`` plus ``|sum|`` over the same fc2 columns. For
    ``*_max_dim``, e is the largest embed dim of the space. Returns None for ``deeper_is_better``.
    """
    check_block_score_method(method)
    if method == "deeper_is_better":
        return None
    embed_dims = sorted(embed_dims)
    choices = sorted(mlp_ratios)
    max_dim = max(embed_dims)
    if gradients is None:
        raise ProxyError(f"block score method {method!r} needs the proxy gradient")

    table_embeds = _table_embeds(method, embed_dims)
    fc1_prefix, fc2_prefix = [], []
    for layer in range(depth):
        fc1, fc2 = f"blocks.{layer}.fc1.weight", f"blocks.{layer}.fc2.weight"
        fc1_elements = _block_element_scores(method, parameters[fc1][:, :max_dim], gradients[fc1][:, :max_dim])
        fc2_elements = _block_element_scores(method, parameters[fc2][:max_dim, :], gradients[fc2][:max_dim, :])
        fc1_prefix.append({embed: _prefix_sums(fc1_elements[:, :embed].sum(1)).numpy() for embed in table_embeds})
        fc2_prefix.append({embed: _prefix_sums(fc2_elements[:embed, :].sum(0)).numpy() for embed in table_embeds})

    scores: dict[tuple[int, float], np.ndarray] = {}
    for embed in embed_dims:
        table_embed = max_dim if method.endswith("_max_dim") else embed
        for lower, upper in zip(choices, choices[1:]):
            start, stop = int(table_embed * lower), int(table_embed * upper)
            scores[(embed, upper)] = np.array([
                abs(fc1_prefix[layer][table_embed][stop] - fc1_prefix[layer][table_embed][start])
                + abs(fc2_prefix[layer][table_embed][stop] - fc2_prefix[layer][table_embed][start])
                for layer in range(depth)
            ])
    return scores

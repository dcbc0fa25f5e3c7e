"""Swin Transformer encoder of Swin UNETR (3D), able to load the published Swin UNETR weights.

Tensor layout: the input is ``(B, C, D, H, W)``; for CT patches D, H, W are the array axes in the
layout the weights were trained in, ``[x, y, z]`` in RAS orientation for the published ones, which
``head.to_encoder_layout`` makes of our ``[z, y, x]`` LPS patches. ``SwinEncoder.forward`` returns five
feature maps, stage ``i`` of shape ``(B, feature_size * 2**i, D / 2**(i+1), H / 2**(i+1), W / 2**(i+1))``,
each layer-normalised over channels without affine parameters. Inside the encoder, tokens are kept
channels-last, ``(B, D', H', W', C)``, so that the stage outputs are returned as channels-last-3d views.

Module and parameter names follow the ``swinViT`` part of the Swin UNETR reference implementation
(``patch_embed.proj``, ``layers1.0.blocks.0.attn.qkv``, ``layers1.0.downsample.reduction`` ...),
so its state dicts map one to one. Numerically the encoder equals that implementation (with the
"merging" downsampling of releases up to 1.4, which the published weights were trained with); it is
faster because window attention runs through ``scaled_dot_product_attention`` with the relative
position bias and the shifted-window mask folded into one additive mask.

Reference: Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain
Tumors in MRI Images" (2022); Liu et al., "Swin Transformer: Hierarchical Vision Transformer using
Shifted Windows" (2021).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import checkpoint as torch_checkpoint

MASKED_SCORE = -100.0  # added to attention scores between tokens of different shifted regions
NUM_STAGES = 4


# --- geometry of windows ------------------------------------------------------

@dataclass(frozen=True, eq=False)   # compared and hashed as the object build_geometry caches
class WindowGeometry:
    """How one stage's token grid ``size = (d, h, w)`` is cut into attention windows.

    window: window edge per axis (shrunk to the grid size where the grid is not larger).
    shift: cyclic shift per axis of the shifted blocks (0 where the window was shrunk).
    padded: grid size after zero padding to whole windows.
    groups: boxes of windows ``((d0, d1), (h0, h1), (w0, w1))`` in window-grid units that share one
        shift mask and the same padding tokens (a single box of all windows when nothing is shifted or
        padded); ``group_masks[g]`` is that ``(N, N)`` mask (0 or -100), None when nothing is shifted.
    real_tokens: per box, the positions (in window order) of its windows' real tokens, the others being
        padding; None where every token is real.
    by_padding: an inference geometry (boxes split by their padding), which
        :meth:`WindowAttention._attend_gathered` runs.
    """
    size: Tuple[int, int, int]
    window: Tuple[int, int, int]
    shift: Tuple[int, int, int]
    padded: Tuple[int, int, int]
    groups: Tuple[Tuple[Tuple[int, int], ...], ...]
    group_masks: Optional[torch.Tensor]
    real_tokens: Tuple[Optional[torch.Tensor], ...] = (None,)
    by_padding: bool = False

    @property
    def counts(self) -> Tuple[int, ...]:
        """Windows per axis."""
        return tuple(p // w for p, w in zip(self.padded, self.window))

    @property
    def tokens_per_window(self) -> int:
        return math.prod(self.window)

    @property
    def needs_padding(self) -> bool:
        return self.padded != self.size or self.shifted

    @property
    def shifted(self) -> bool:
        return any(s > 0 for s in self.shift)

    def boxes(self, batch: int) -> Iterator[Tuple[slice, Tuple[slice, ...], Tuple[int, ...]]]:
        """Per group: its rows in :func:`partition_windows` order, its window-grid slices, its shape."""
        start = 0
        for box in self.groups:
            shape = tuple(end - begin for begin, end in box)
            count = batch * math.prod(shape)
            yield slice(start, start + count), tuple(slice(*span) for span in box), shape
            start += count


def region_labels(padded: Sequence[int], window: Sequence[int], shift: Sequence[int]) -> torch.Tensor:
    """Label ``(Dp, Hp, Wp)`` of the cyclically shifted regions, as the shifted-window scheme defines them."""
    labels = torch.zeros(tuple(padded), dtype=torch.int64)
    cuts = [(slice(-w), slice(-w, -s), slice(-s, None)) for w, s in zip(window, shift)]
    for count, region in enumerate(itertools.product(*cuts)):
        labels[region] = count
    return labels


@functools.lru_cache(maxsize=64)
def build_geometry(size: Tuple[int, int, int], window: int, shifted: bool = True,
                   by_padding: bool = False) -> WindowGeometry:
    """Window geometry of a token grid ``size = (d, h, w)`` for the shifted blocks, or with ``shifted=False``
    for the plain ones; cached, masks are float32 on the CPU. With ``by_padding`` (inference), boxes also
    split windows by their padding tokens, and ``real_tokens`` says where their real ones are; in training the
    fewer, larger boxes are faster."""
    windows = tuple(min(n, window) for n in size)
    shifts = tuple(window // 2 if shifted and n > window else 0 for n in size)
    padded = tuple(-(-n // w) * w for n, w in zip(size, windows))
    counts = [p // w for p, w in zip(padded, windows)]
    plain = WindowGeometry(size, windows, shifts, padded, (tuple((0, c) for c in counts),), None)
    runs, real_along = zip(*(_axis_runs(*axis, by_padding) for axis in zip(size, padded, windows, shifts)))
    boxes = tuple(itertools.product(*runs))
    real_tokens = tuple(_real_positions([real[first] for real, (first, _) in zip(real_along, box)])
                        if by_padding else None for box in boxes)
    if not any(shifts):
        return WindowGeometry(size, windows, shifts, padded, boxes, None, real_tokens, by_padding)
    labels = region_labels(padded, windows, shifts)[None, ..., None]
    labels = partition_windows(labels, plain, 1, 1).reshape(*counts, -1)  # (nd, nh, nw, N)
    all_masks = (labels.unsqueeze(-1) != labels.unsqueeze(-2))  # (nd, nh, nw, N, N)
    # Only the last window along a shifted axis straddles regions, so the windows of each box share one
    # mask; attention then runs once per box with a small mask.
    masks = []
    for box in boxes:
        block = all_masks[tuple(slice(*span) for span in box)]
        first = block[0, 0, 0]
        if not bool((block == first).all()):
            raise RuntimeError(f"windows of box {box} do not share one shift mask")
        masks.append(first.to(torch.float32) * MASKED_SCORE)
    return WindowGeometry(size, windows, shifts, padded, boxes, torch.stack(masks), real_tokens, by_padding)


def _axis_runs(n: int, padded: int, window: int, shift: int, by_padding: bool) -> Tuple[list, list]:
    """Along one axis of ``n`` tokens (``padded`` after padding, windows of ``window``, rolled by ``-shift``):
    the runs ``(first, end)`` of consecutive windows that have the same shift regions (on a shifted axis only
    the last window straddles them) and, with ``by_padding``, their real tokens at the same places; and per
    window the boolean ``(window,)`` of its real tokens."""
    count = padded // window
    real = [torch.tensor([(i * window + t + shift) % padded < n for t in range(window)])
            for i in range(count)]
    keys = [(tuple(r.tolist()) if by_padding else (), shift > 0 and i == count - 1)
            for i, r in enumerate(real)]
    runs = [[0, 1]]
    for i in range(1, count):
        if keys[i] == keys[i - 1]:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [tuple(run) for run in runs], real


def _real_positions(real_along: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """Positions, in window order (d, h, w row-major), of the real tokens of a window whose real tokens along
    each axis are ``real_along``; None when all are real."""
    d, h, w = real_along
    real = (d[:, None, None] & h[None, :, None] & w[None, None, :]).reshape(-1)
    return None if bool(real.all()) else torch.nonzero(real).squeeze(1)


@functools.lru_cache(maxsize=16)   # two batch sizes of a model's 8 geometries (large at a GPU's batch 256)
def gather_index(geometry: WindowGeometry, batch: int, device: torch.device
                 ) -> Tuple[Tuple[torch.Tensor, torch.Tensor], ...]:
    """Inference: where each box's windows of ``geometry`` (built ``by_padding``) find their tokens in a table
    of ``batch * d * h * w`` token rows (``(B, d, h, w)`` row-major) followed by one row of zeros. Per box:
    ``(keys, queries)``, ``keys`` ``(windows * K,)``: each window's real tokens (``geometry.real_tokens``) in
    window order (row-major d, h, w of the window cut from the grid padded and rolled by ``-shift``), then the
    zero row when the box has padding tokens; ``queries`` ``(windows * R,)``: its real tokens only, where its
    attention output goes."""
    # the original position of each rolled one (padding positions are cut out below, through real_tokens)
    rolled = [(torch.arange(p) + s) % p for p, s in zip(geometry.padded, geometry.shift)]
    (_, h, w), tokens = geometry.size, math.prod(geometry.size)
    flat = (rolled[0][:, None, None] * h + rolled[1][None, :, None]) * w + rolled[2][None, None, :]
    (nd, nh, nw), (w0, w1, w2) = geometry.counts, geometry.window
    grid = flat.reshape(nd, w0, nh, w1, nw, w2).permute(0, 2, 4, 1, 3, 5).reshape(nd, nh, nw, -1)
    offsets = tokens * torch.arange(batch)[:, None, None]
    index = []
    for box, real in zip(geometry.groups, geometry.real_tokens, strict=True):
        rows = grid[tuple(slice(*span) for span in box)].reshape(-1, grid.shape[-1])
        queries = ((rows if real is None else rows[:, real])[None] + offsets).reshape(len(rows) * batch, -1)
        keys = queries if real is None else torch.cat(
            [queries, torch.full((len(queries), 1), batch * tokens)], dim=1)
        index.append((keys.reshape(-1).to(device), queries.reshape(-1).to(device)))
    return tuple(index)


def _shift_pieces(geometry: WindowGeometry) -> Iterator[Tuple[tuple, tuple]]:
    """(index into the padded and rolled grid, index into the unpadded grid) pairs of ``(B, d, h, w, C)``
    pieces that a cyclic shift by ``-shift`` moves as a whole (up to two per axis)."""
    per_axis = []
    for n, p, s in zip(geometry.size, geometry.padded, geometry.shift):
        if s == 0:
            per_axis.append([(slice(0, n), slice(0, n))])
        else:
            per_axis.append([(slice(0, n - s), slice(s, n)), (slice(p - s, p), slice(0, s))])
    for pieces in itertools.product(*per_axis):
        rolled, plain = zip(*pieces)
        yield (slice(None),) + rolled, (slice(None),) + plain


def pad_and_roll(x: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
    """Zero-pad ``(B, d, h, w, C)`` to whole windows and roll by ``-shift`` in one copy."""
    if not geometry.needs_padding:
        return x
    out = x.new_empty((x.shape[0], *geometry.padded, x.shape[-1]))
    # After the roll, the padding along each axis is one slab [n - shift, p - shift).
    for axis, (n, p, s) in enumerate(zip(geometry.size, geometry.padded, geometry.shift)):
        if p > n:
            out.narrow(axis + 1, n - s, p - n).zero_()
    for rolled, plain in _shift_pieces(geometry):
        out[rolled] = x[plain]
    return out


def unroll_and_crop(x: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
    """Inverse of :func:`pad_and_roll`: ``(B, Dp, Hp, Wp, C)`` back to a contiguous ``(B, d, h, w, C)``."""
    if not geometry.shifted:
        d, h, w = geometry.size
        return x[:, :d, :h, :w].contiguous()
    out = x.new_empty((x.shape[0], *geometry.size, x.shape[-1]))
    for rolled, plain in _shift_pieces(geometry):
        out[plain] = x[rolled]
    return out


def partition_windows(x: torch.Tensor, geometry: WindowGeometry, parts: int, heads: int) -> torch.Tensor:
    """``(B, Dp, Hp, Wp, parts*heads*hd)`` -> ``(parts, windows, heads, N, hd)``, the windows ordered box
    by box (``geometry.groups``), inside a box by (batch, d, h, w)."""
    b = x.shape[0]
    (nd, nh, nw), (w0, w1, w2) = geometry.counts, geometry.window
    head_dim = x.shape[-1] // (parts * heads)
    grid = x.reshape(b, nd, w0, nh, w1, nw, w2, parts, heads, head_dim)
    order = (7, 0, 1, 3, 5, 8, 2, 4, 6, 9)
    n = geometry.tokens_per_window
    if len(geometry.groups) == 1:
        return grid.permute(order).reshape(parts, -1, heads, n, head_dim)
    out = x.new_empty(parts, b * math.prod(geometry.counts), heads, n, head_dim)
    for rows, (sd, sh, sw), shape in geometry.boxes(b):
        target = out[:, rows].view(parts, b, *shape, heads, w0, w1, w2, head_dim)
        target.copy_(grid[:, sd, :, sh, :, sw].permute(order))
    return out


def merge_windows(windows: torch.Tensor, geometry: WindowGeometry, batch: int) -> torch.Tensor:
    """Inverse of :func:`partition_windows`: ``(parts, windows, heads, N, hd)`` -> ``(B, Dp, Hp, Wp, C)``."""
    parts, _, heads, _, head_dim = windows.shape
    (dp, hp, wp), (w0, w1, w2) = geometry.padded, geometry.window
    (nd, nh, nw), channels = geometry.counts, parts * heads * head_dim
    order = (1, 2, 6, 3, 7, 4, 8, 0, 5, 9)
    if len(geometry.groups) == 1:
        grid = windows.reshape(parts, batch, nd, nh, nw, heads, w0, w1, w2, head_dim).permute(order)
        return grid.reshape(batch, dp, hp, wp, channels)
    out = windows.new_empty(batch, nd, w0, nh, w1, nw, w2, parts, heads, head_dim)
    for rows, (sd, sh, sw), shape in geometry.boxes(batch):
        source = windows[:, rows].reshape(parts, batch, *shape, heads, w0, w1, w2, head_dim)
        out[:, sd, :, sh, :, sw].copy_(source.permute(order))
    return out.view(batch, dp, hp, wp, channels)


class _WithAdjoint(torch.autograd.Function):
    """``forward_fn(x)`` with ``adjoint_fn(grad)`` as its exact backward, for the layout changes above
    (autograd of their slice copies would zero-fill a full-size gradient per slice)."""

    @staticmethod
    def forward(ctx, x, forward_fn, adjoint_fn):
        ctx.adjoint_fn = adjoint_fn
        return forward_fn(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.adjoint_fn(grad), None, None


def relative_position_index(window: int) -> torch.Tensor:
    """``(N, N)`` index into the bias table for token pairs of a ``window**3`` window (row-major d, h, w)."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(window)] * 3, indexing="ij")).flatten(1)  # (3, N)
    delta = (coords[:, :, None] - coords[:, None, :]) + (window - 1)  # (3, N, N), each in 0..2w-2
    span = 2 * window - 1
    return delta[0] * span * span + delta[1] * span + delta[2]


def _aligned_mask(mask: torch.Tensor) -> torch.Tensor:
    """On CUDA, store the mask with rows padded to 16 elements so fused attention need not copy it."""
    if mask.device.type != "cuda" or mask.shape[-1] % 16 == 0:
        return mask
    extra = 16 - mask.shape[-1] % 16
    return F.pad(mask, (0, extra))[..., :mask.shape[-1]]


# Bytes of one (windows, heads, N, N) float32 block of probabilities that the attention backward works on at
# a time: a few windows, not all of a batch's (hundreds of MB at 64^3), so that its passes stay in cache.
BACKWARD_BLOCK_BYTES = 2 ** 23


class _AttentionWithBiasGrad(torch.autograd.Function):
    """Fused attention forward with a hand-written backward that also returns the mask gradient.

    On the CPU, ``scaled_dot_product_attention`` falls back to its unfused path whenever the additive
    mask needs a gradient (the learned relative position bias in training). Here the forward stays
    fused and the backward recomputes the probabilities, a few windows at a time
    (:data:`BACKWARD_BLOCK_BYTES`).
    """

    @staticmethod
    def forward(ctx, q, k, v, mask):
        # detached: the fused kernel is only chosen for inputs that do not require a gradient
        out = F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach(), attn_mask=mask.detach())
        ctx.save_for_backward(q, k, v, mask, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask, out = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        shared = mask.shape[0] == 1
        grad_q, grad_k, grad_v = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        grad_mask = None
        if ctx.needs_input_grad[3]:
            grad_mask = torch.zeros_like(mask, dtype=torch.float32) if shared else torch.empty_like(mask)
        step = max(1, BACKWARD_BLOCK_BYTES // (4 * math.prod(q.shape[1:3]) * k.shape[2]))
        for start in range(0, q.shape[0], step):
            rows = slice(start, start + step)
            qs, ks, vs, gs = q[rows], k[rows], v[rows], grad_out[rows]
            scores = torch.matmul(qs, ks.transpose(-2, -1)).mul_(scale).add_(mask if shared else mask[rows])
            probs = torch.softmax(scores, dim=-1)
            grad_v[rows] = torch.matmul(probs.transpose(-2, -1), gs)
            delta = (gs * out[rows]).sum(dim=-1, keepdim=True)
            grad_scores = probs.mul_(torch.matmul(gs, vs.transpose(-2, -1)).sub_(delta))  # softmax backward
            if grad_mask is not None:
                if shared:
                    grad_mask += grad_scores.sum(dim=0, keepdim=True)
                else:
                    grad_mask[rows] = grad_scores
            torch.matmul(grad_scores, ks, out=grad_q[rows]).mul_(scale)
            torch.matmul(grad_scores.transpose(-2, -1), qs, out=grad_k[rows]).mul_(scale)
        if grad_mask is not None:
            grad_mask = grad_mask.to(mask.dtype)
        return grad_q, grad_k, grad_v, grad_mask


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention ``(Bw, heads, N, hd)`` with additive ``mask`` ``(1, heads, N, N)``."""
    if mask.requires_grad and torch.is_grad_enabled() and q.device.type == "cpu":
        return _AttentionWithBiasGrad.apply(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# --- modules --------------------------------------------------------------------

class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size**3`` patches to ``embed_dim`` features (a strided convolution)."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` -> channels-last tokens ``(B, D/p, H/p, W/p, embed_dim)``."""
        b, c, d, h, w = x.shape
        p = self.patch_size
        patches = x.reshape(b, c, d // p, p, h // p, p, w // p, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        patches = patches.reshape(b, d // p, h // p, w // p, c * p * p * p)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a learned relative position bias."""

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 3, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("query_bias_only", torch.cat([torch.ones(dim), torch.zeros(2 * dim)]),
                             persistent=False)
        self._mask_cache: Dict[tuple, torch.Tensor] = {}
        self._shift_mask_cache: Dict[tuple, torch.Tensor] = {}

    def clear_cache(self) -> None:
        self._mask_cache.clear()
        self._shift_mask_cache.clear()

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    def _shift_masks(self, geometry: WindowGeometry, device: torch.device) -> torch.Tensor:
        """``(G, 1, N, N)`` shift masks of ``geometry`` on ``device``, copied there once (not every training
        step)."""
        key = (geometry.size, geometry.shift, geometry.groups, device)
        if key not in self._shift_mask_cache:
            self._shift_mask_cache[key] = geometry.group_masks.to(device).unsqueeze(1)
        return self._shift_mask_cache[key]

    def _cache_key(self, geometry: WindowGeometry, dtype: torch.dtype) -> tuple:
        """What a geometry's masks depend on: its boxes, the dtype, the bias table's current values."""
        table = self.relative_position_bias_table
        return (geometry.size, geometry.shift, geometry.groups, table.device, dtype, table.data_ptr(),
                table._version)

    def _masks(self, geometry: WindowGeometry, dtype: torch.dtype) -> torch.Tensor:
        """Additive masks ``(G, heads, N, N)``: relative position bias plus each box's shift mask."""
        table = self.relative_position_bias_table
        cacheable = not self.training and not (torch.is_grad_enabled() and table.requires_grad)
        key = self._cache_key(geometry, dtype)
        if cacheable and key in self._mask_cache:
            return self._mask_cache[key]
        n = geometry.tokens_per_window
        index = self.relative_position_index[:n, :n].reshape(-1)
        masks = table[index].reshape(n, n, self.num_heads).permute(2, 0, 1).unsqueeze(0)  # (1, heads, N, N)
        if geometry.shifted:
            masks = masks + self._shift_masks(geometry, table.device)
        masks = _aligned_mask(masks.to(dtype).contiguous())
        if cacheable:
            self._remember(key, masks)
        return masks

    def _remember(self, key: tuple, masks) -> None:
        """Keep masks for ``key`` in the cache, which holds a few geometries at most."""
        if len(self._mask_cache) >= 8:
            self._mask_cache.clear()
        self._mask_cache[key] = masks

    def forward(self, x: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
        """Attention over windows of normalised tokens ``(B, d, h, w, C)``; returns the same shape.

        The key bias of ``qkv`` shifts every score of a query by one constant, which softmax ignores,
        and the value bias passes through attention unchanged (weights sum to one) and is folded into
        ``proj``; so the projection runs on the unpadded tokens and padding stays zero.
        """
        if geometry.by_padding:
            return self._attend_gathered(x, geometry)
        batch, heads = x.shape[0], self.num_heads
        pad = functools.partial(pad_and_roll, geometry=geometry)
        crop = functools.partial(unroll_and_crop, geometry=geometry)
        qkv = F.linear(x, self.qkv.weight, self._qkv_bias())
        if geometry.needs_padding:
            qkv = _WithAdjoint.apply(qkv, pad, crop)  # (B, Dp, Hp, Wp, 3C)
        windows = _WithAdjoint.apply(qkv, lambda t: partition_windows(t, geometry, 3, heads),
                                     lambda grad: merge_windows(grad, geometry, batch))
        q, k, v = windows.unbind(0)  # each (windows, heads, N, hd)
        masks = self._masks(geometry, q.dtype)
        if len(geometry.groups) == 1:
            attended = window_attention(q, k, v, masks)
        else:
            sizes = [rows.stop - rows.start for rows, _, _ in geometry.boxes(batch)]
            attended = torch.cat([window_attention(*qkv_box, mask) for mask, qkv_box in
                                  zip(self._box_masks(masks, geometry),
                                      zip(q.split(sizes), k.split(sizes), v.split(sizes)), strict=True)])
        # out: (B, Dp, Hp, Wp, C)
        out = _WithAdjoint.apply(attended.unsqueeze(0), lambda t: merge_windows(t, geometry, batch),
                                 lambda grad: partition_windows(grad, geometry, 1, heads))
        if geometry.needs_padding:
            out = _WithAdjoint.apply(out, crop, pad)
        return F.linear(out, self.proj.weight, self._proj_bias())

    def _qkv_bias(self) -> torch.Tensor:
        """``qkv``'s bias with the key and value parts zeroed (see :meth:`forward`)."""
        return self.qkv.bias * self.query_bias_only

    def _proj_bias(self) -> torch.Tensor:
        """``proj``'s bias with ``qkv``'s value bias folded in (see :meth:`forward`)."""
        return self.proj.bias + F.linear(self.qkv.bias[2 * self.dim:], self.proj.weight)

    @staticmethod
    def _box_masks(masks: torch.Tensor, geometry: WindowGeometry) -> List[torch.Tensor]:
        """Each box's ``(1, heads, N, N)`` mask. Unbind, not slices: in training, autograd zero-fills a
        full-size gradient for every slice."""
        if not geometry.shifted:
            return [masks] * len(geometry.groups)
        return [mask.unsqueeze(0) for mask in masks.unbind(0)]

    def _real_masks(self, geometry: WindowGeometry, dtype: torch.dtype) -> List[torch.Tensor]:
        """Each box's mask for :meth:`_attend_gathered`: ``(1, heads, N, N)`` where every token is real,
        else ``(1, heads, R, R + 1)``: the scores' masks among its R real tokens, then for each real query the
        log-sum-exp of its masks to the padding tokens (cached as :meth:`_masks` is)."""
        key = ("real",) + self._cache_key(geometry, dtype)
        if not self.training and key in self._mask_cache:
            return self._mask_cache[key]
        chosen = []
        for mask, real in zip(self._box_masks(self._masks(geometry, dtype), geometry), geometry.real_tokens,
                              strict=True):
            if real is None:
                chosen.append(mask)
                continue
            real = real.to(mask.device)
            padding = torch.ones(mask.shape[-1], dtype=torch.bool, device=mask.device)
            padding[real] = False
            to_real = mask[:, :, real]
            pooled = torch.logsumexp(to_real[..., padding].float(), dim=-1, keepdim=True).to(mask.dtype)
            chosen.append(torch.cat([to_real[..., real], pooled], dim=-1).contiguous())
        if not self.training:
            self._remember(key, chosen)
        return chosen

    def _attend_gathered(self, x: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
        """Inference: :meth:`forward` over the real tokens only, with one gather and one scatter of the tokens
        per box of windows (:func:`gather_index`) in place of padding, rolling and cutting windows and their
        inverses. A padding token is zero after the projection (no key or value bias), so its score for a
        query is the mask alone and its value zero: a window's padding tokens count as one zero key, whose
        mask is the log-sum-exp of theirs (:meth:`_real_masks`). Under autocast the layers run in its dtype,
        as they would through it."""
        device, channels, heads = x.device.type, self.dim, self.num_heads
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        weight, proj = self.qkv.weight.to(dtype), self.proj.weight.to(dtype)
        with torch.autocast(device, enabled=False):
            table = x.new_empty((x[..., 0].numel() + 1, 3 * channels), dtype=dtype)   # then a zero row
            table[-1].zero_()
            torch.addmm(self._qkv_bias().to(dtype), x.reshape(-1, channels).to(dtype), weight.t(),
                        out=table[:-1])
            attended = table.new_empty((len(table) - 1, channels))
            for (keys, queries), mask in zip(gather_index(geometry, x.shape[0], x.device),
                                             self._real_masks(geometry, dtype), strict=True):
                n_keys, n_queries = mask.shape[-1], mask.shape[-2]
                windows = table.index_select(0, keys).view(-1, n_keys, 3, heads, channels // heads)
                q, k, v = (windows[:, :n_queries, 0], windows[:, :, 1], windows[:, :, 2])
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     attn_mask=mask)
                attended.index_copy_(0, queries, out.transpose(1, 2).reshape(-1, channels))
            return F.linear(attended.view(*x.shape[:-1], channels), proj, self._proj_bias().to(dtype))


class MLPBlock(nn.Module):
    """Two linear layers with exact GELU in between."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class SwinTransformerBlock(nn.Module):
    """Pre-norm window attention and MLP, each with a residual connection, on ``(B, d, h, w, C)``."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shifted: bool,
                 use_checkpoint: bool) -> None:
        super().__init__()
        self.shifted = shifted
        self.use_checkpoint = use_checkpoint
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, 4 * dim)

    def _residual(self, branch, x: torch.Tensor) -> torch.Tensor:
        """``x + branch(x)``; with checkpointing, the branch is recomputed in the backward pass."""
        if self.use_checkpoint and torch.is_grad_enabled():
            return x + torch_checkpoint.checkpoint(branch, x, use_reentrant=False)
        return x + branch(x)

    def forward(self, x: torch.Tensor, geometry: WindowGeometry, plain: WindowGeometry) -> torch.Tensor:
        x = self._residual(lambda t: self.attn(self.norm1(t), geometry if self.shifted else plain), x)
        return self._residual(lambda t: self.mlp(self.norm2(t)), x)


class PatchMerging(nn.Module):
    """2x downsampling: concatenate 8 sub-grids (legacy order of the published weights), norm, linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, d, h, w, C)`` -> ``(B, ceil(d/2), ceil(h/2), ceil(w/2), 2C)``; odd sizes are zero-padded."""
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        # The order (with sub-grids 5 and 6 repeating 2 and 3) is what the pretrained weights expect.
        offsets = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in offsets], dim=-1)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks alternating plain and shifted windows, then patch merging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, use_checkpoint: bool) -> None:
        super().__init__()
        self.window_size = window_size
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, num_heads, window_size, shifted=(i % 2 == 1),
                                 use_checkpoint=use_checkpoint)
            for i in range(depth)])
        self.downsample = PatchMerging(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Channels-last tokens ``(B, d, h, w, C)`` -> ``(B, d/2, h/2, w/2, 2C)``."""
        size, by_padding = tuple(x.shape[1:4]), not torch.is_grad_enabled()
        shifted = build_geometry(size, self.window_size, True, by_padding)
        plain = build_geometry(size, self.window_size, False, by_padding)
        for block in self.blocks:
            x = block(x, shifted, plain)
        return self.downsample(x)


class SwinEncoder(nn.Module):
    """3D Swin Transformer encoder of Swin UNETR (the ``swinViT`` sub-module), without decoder.

    Args:
        in_channels: input channels C of ``(B, C, D, H, W)``.
        feature_size: channels of the first stage; must be divisible by 12 (as for the published models).
        depths, num_heads: blocks and attention heads of each of the 4 stages.
        window_size: attention window edge in tokens (7 for the published weights).
        patch_size: edge of the non-overlapping patches embedded as tokens.
        use_checkpoint: recompute activations in the backward pass to save memory.
    """

    def __init__(self, in_channels: int = 1, feature_size: int = 48, depths: Sequence[int] = (2, 2, 2, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, patch_size: int = 2,
                 use_checkpoint: bool = False) -> None:
        super().__init__()
        depths, num_heads = tuple(depths), tuple(num_heads)
        _validate_arguments(in_channels, feature_size, depths, num_heads, window_size, patch_size)
        self.in_channels = in_channels
        self.feature_size = feature_size
        self.window_size = window_size
        self.patch_size = patch_size
        self.size_multiple = patch_size * 2 ** NUM_STAGES
        self.patch_embed = PatchEmbed(in_channels, feature_size, patch_size)
        for i in range(NUM_STAGES):
            layer = BasicLayer(feature_size * 2 ** i, depths[i], num_heads[i], window_size, use_checkpoint)
            setattr(self, f"layers{i + 1}", nn.ModuleList([layer]))

    @property
    def out_channels(self) -> List[int]:
        """Channels of the five outputs of :meth:`forward`."""
        return [self.feature_size * 2 ** i for i in range(NUM_STAGES + 1)]

    def clear_cache(self) -> None:
        """Drop cached attention masks (done automatically when parameters change or in training)."""
        for module in self.modules():
            if isinstance(module, WindowAttention):
                module.clear_cache()

    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5:
            raise ValueError(f"expected input (B, C, D, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]} "
                             f"(shape {tuple(x.shape)})")
        if any(n % self.size_multiple for n in x.shape[2:]) or min(x.shape[2:]) == 0:
            raise ValueError(f"spatial sizes must be positive multiples of {self.size_multiple}, "
                             f"got {tuple(x.shape[2:])}")

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``(B, C, D, H, W)`` -> the five stage maps, with shapes as in the module docstring."""
        self.check_input(x)
        tokens = self.patch_embed(x)
        outputs = [_normalised(tokens)]
        for i in range(NUM_STAGES):
            tokens = getattr(self, f"layers{i + 1}")[0](tokens)
            outputs.append(_normalised(tokens))
        return outputs


def attention_flops(encoder: SwinEncoder, spatial: Sequence[int], inference: bool = False) -> int:
    """FLOPs of the window attention of one input of spatial size ``(D, H, W)``: the scores and the weighted
    sum, ``4 * queries * keys * C`` per window (C channels over all heads). In training every window has N
    queries and keys, padding included; in ``inference`` a window with padding has R real queries and R + 1
    keys (``WindowAttention._attend_gathered``). FLOP counters that do not see the fused attention kernels
    (torch's, on the CPU) leave this out."""
    size = tuple(int(n) // encoder.patch_size for n in spatial)
    total = 0
    for i in range(NUM_STAGES):
        dim = encoder.feature_size * 2 ** i
        for block in getattr(encoder, f"layers{i + 1}")[0].blocks:
            geometry = build_geometry(size, encoder.window_size, block.shifted, inference)
            for (_, _, shape), real in zip(geometry.boxes(1), geometry.real_tokens):
                n = geometry.tokens_per_window
                queries, keys = (n, n) if real is None else (len(real), len(real) + 1)
                total += 4 * math.prod(shape) * queries * keys * dim
        size = tuple(-(-n // 2) for n in size)
    return total


def _normalised(tokens: torch.Tensor) -> torch.Tensor:
    """Layer norm over channels (no affine) of ``(B, d, h, w, C)``, returned as a ``(B, C, d, h, w)`` view."""
    return F.layer_norm(tokens, tokens.shape[-1:]).permute(0, 4, 1, 2, 3)


def _validate_arguments(in_channels: int, feature_size: int, depths: tuple, num_heads: tuple,
                        window_size: int, patch_size: int) -> None:
    _check_integer("in_channels", in_channels, 1)
    if not isinstance(feature_size, int) or feature_size < 12 or feature_size % 12:
        raise ValueError(f"feature_size must be a positive multiple of 12, got {feature_size!r}")
    for name, values in (("depths", depths), ("num_heads", num_heads)):
        if len(values) != NUM_STAGES or any(not isinstance(n, int) or n < 1 for n in values):
            raise ValueError(f"{name} must be {NUM_STAGES} positive integers, got {values!r}")
    for i, heads in enumerate(num_heads):
        if (feature_size * 2 ** i) % heads:
            raise ValueError(f"stage {i + 1} has {feature_size * 2 ** i} channels, not divisible by "
                             f"{heads} heads")
    _check_integer("window_size", window_size, 2)
    _check_integer("patch_size", patch_size, 1)


def _check_integer(name: str, value, least: int) -> None:
    if not isinstance(value, int) or value < least:
        wanted = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise ValueError(f"{name} must be {wanted}, got {value!r}")


# --- pretrained weights -----------------------------------------------------------

_ENCODER_PREFIXES = ("swinViT.", "swin_vit.")
_SHOWN_NAMES = 8
# numeric numpy types whose scalars (metrics such as "best_acc") checkpoints may hold
_NUMPY_SCALAR_TYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                       "float16", "float32", "float64", "complex64", "complex128")


def torch_load_weights(path, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` that also accepts numpy scalars and their dtypes.

    Training scripts such as the Swin UNETR BraTS21 trainer save ``best_acc`` as a numpy scalar, which
    ``weights_only`` refuses by default. Only the numpy globals that rebuild such scalars are allowed
    (``scalar`` under its numpy 1 and numpy 2 module names, ``numpy.dtype`` and the numeric dtype
    classes); anything else a pickle names, code to run included, is still refused by ``torch.load``.
    """
    scalar = np.float64(0).__reduce__()[0]  # numpy's scalar rebuilder, public in neither numpy 1 nor 2
    allowed = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    allowed += [type(np.dtype(name)) for name in _NUMPY_SCALAR_TYPES]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location=map_location, weights_only=True)


def _listing(names: Sequence[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:_SHOWN_NAMES])
    return shown + (f" ... ({len(names)} in all)" if len(names) > _SHOWN_NAMES else "")


def _read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: a bare state dict or one under "state_dict" / "model"."""
    from data import UserError
    if not path.is_file():
        raise UserError(f"{path}: checkpoint file not found")
    try:
        obj = torch_load_weights(path)
    except Exception as err:  # torch raises many kinds for text, truncated or unsafe files
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    for _ in range(2):
        if isinstance(obj, dict):
            inner = obj.get("state_dict", obj.get("model"))
            if isinstance(inner, dict):
                obj = inner
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path}: holds no state dict (found {type(obj).__name__})")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path}: holds no tensors")
    return tensors


def encoder_key(checkpoint_key: str) -> str:
    """Encoder parameter name of a checkpoint key: strips ``module.`` and ``swinViT.``,
    fc1/fc2 -> linear1/2."""
    key = checkpoint_key
    while key.startswith("module."):
        key = key[len("module."):]
    prefix = next((p for p in _ENCODER_PREFIXES if key.startswith(p)), "")
    return key[len(prefix):].replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")


def _sorted_tensors(path: Path, tensors: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor]):
    """Sort checkpoint tensors into (encoder tensors to load, ignored keys, mismatches, conversion notes)."""
    from data import UserError
    new_state: Dict[str, torch.Tensor] = {}
    sources: Dict[str, str] = {}
    ignored, mismatched, converted = [], [], []
    for key, value in tensors.items():
        name = encoder_key(key)
        if name not in own:
            ignored.append(key)
            continue
        if name in sources:
            raise UserError(f"{path}: keys {sources[name]} and {key} both map to encoder tensor {name}")
        sources[name] = key
        expected = own[name].shape
        if name == "patch_embed.proj.weight" and value.dim() == 5 and value.shape != expected \
                and expected[1] == 1 and value.shape[:1] + value.shape[2:] == expected[:1] + expected[2:]:
            converted.append(f"{key}: summed over {value.shape[1]} input channels for a 1-channel encoder")
            value = value.sum(dim=1, keepdim=True)
        if value.shape != expected:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(expected)}")
        elif name.endswith("relative_position_index"):
            if not torch.equal(value.to(own[name].dtype), own[name]):
                mismatched.append(f"{key} (values differ from this window size's index)")
        else:
            new_state[name] = value
    return new_state, ignored, mismatched, converted


def load_pretrained(encoder: SwinEncoder, path, verbose: bool = False) -> dict:
    """Load Swin UNETR encoder weights from ``path`` into ``encoder`` (all or nothing).

    Accepts full Swin UNETR checkpoints (``swinViT.*`` keys; other keys ignored), also as saved by the
    published trainers (numpy ``best_acc``, optimizer and scheduler state, ``module.`` prefixes), the
    self-supervised ``module.*`` checkpoint (``mlp.fc1``/``fc2`` names; heads ignored), bare state dicts
    and dicts under "state_dict" or "model". A patch embedding trained on several input channels is summed
    over them for a 1-channel encoder, so one channel gives what the original gives for that channel
    copied into all. Raises ``common.UserError`` naming the file when any encoder tensor is missing or has
    another shape. Returns a report: "loaded", "ignored" (checkpoint keys not used), "converted" notes
    and "summary".
    """
    from data import UserError
    path = Path(path)
    tensors = _read_state_dict(path)
    own = encoder.state_dict()
    wanted = {name for name in own if not name.endswith("relative_position_index")}
    new_state, ignored, mismatched, converted = _sorted_tensors(path, tensors, own)
    if not new_state and not mismatched:
        raise UserError(f"{path}: matches none of the encoder's {len(wanted)} tensors; keys in the file: "
                        f"{_listing(sorted(tensors))}")
    missing = sorted(wanted - set(new_state) - {encoder_key(m.split(' ')[0]) for m in mismatched})
    problems = []
    if mismatched:
        problems.append(f"shape or value mismatch for {_listing(mismatched)}")
    if missing:
        problems.append(f"encoder tensors not in the file: {_listing(missing)}")
    if problems:
        raise UserError(f"{path}: does not fit this encoder (feature_size={encoder.feature_size}, "
                        f"window_size={encoder.window_size}, in_channels={encoder.in_channels}): "
                        + "; ".join(problems))
    for name in own:
        new_state.setdefault(name, own[name])
    encoder.load_state_dict(new_state, strict=True)
    encoder.clear_cache()
    summary = (f"{path}: loaded {len(wanted)} encoder tensors, ignored {len(ignored)} other keys"
               + (f"; {'; '.join(converted)}" if converted else ""))
    if verbose:
        print(summary)
    return {"path": str(path), "loaded": sorted(wanted), "ignored": sorted(ignored),
            "converted": converted, "summary": summary}

"""Causal self-attention over a sliding window of `w` tokens, at a cost that grows with T x w.

A dense boolean mask makes the attention kernel compute the whole T x T score matrix, 4x what a
window of 256 needs at T = 1024, and on CUDA it rules out the fused kernels. Two windowed forms,
both over blocks of CHUNK queries, so each block sees its own keys and the ceil((w-1) / CHUNK)
blocks before it ((p + 1) x CHUNK keys, 384 for w = 256):

* "chunked": the blocks as a batch of small masked SDPA calls (any device, eager autograd);
* "flex": FlexAttention with a block mask that skips the blocks outside the window (CUDA: it
  has no backward on a CPU).

The dense mask stays the reference both are tested against. `plan_window` picks one per shape.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHUNK = 128
"""Queries per block; FlexAttention's default block size, so both windowed forms compute the same
key rectangle (and `ltm.flops` counts one)."""
MIN_SAVING = 2.0
"""Windowed forms are used where they compute at most 1 / MIN_SAVING of the dense score matrix."""


_HAS_FLEX = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
"""FlexAttention came with torch 2.5; the project accepts 2.4, where CUDA takes the chunked form."""


@dataclass(frozen=True)
class Window:
    """How one shape's sliding-window attention is computed, with what it needs precomputed."""

    kind: str
    """"dense", "chunked" or "flex"."""
    size: int
    mask: torch.Tensor | None = None
    """dense: (T, T), True = attend; chunked: (1, n_heads x blocks, CHUNK, keys per block), 0 = attend
    and -inf = not."""
    block_mask: object = None
    """flex: FlexAttention's BlockMask."""


def windowed_keys(w: int) -> int:
    """Keys each query block sees in the windowed forms: its own CHUNK and the blocks that reach back w - 1."""
    return (math.ceil((w - 1) / CHUNK) + 1) * CHUNK


def uses_window_kernel(T: int, w: int) -> bool:
    """Whether a length-T sequence with window w gets a windowed form: whole blocks, and a saving."""
    return T % CHUNK == 0 and windowed_keys(w) * MIN_SAVING <= T


def dense_mask(T: int, w: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(T, device=device)
    offset = i[:, None] - i[None, :]
    return (offset >= 0) & (offset < w)


def window_kind(T: int, w: int, device_type: str, kind: str = "auto") -> str | None:
    """The form `plan_window` takes for a length-T sequence on a device type, or None when w >= T (plain
    causal attention). kind "auto": flex on CUDA and chunked elsewhere where `uses_window_kernel`, else dense."""
    if w >= T:
        return None
    if kind != "auto":
        return kind
    return ("flex" if device_type == "cuda" and _HAS_FLEX else "chunked") if uses_window_kernel(T, w) else "dense"


def plan_window(T: int, w: int, n_heads: int, device: torch.device, kind: str = "auto") -> Window | None:
    """The window of a length-T sequence (`window_kind`), or None when w >= T (plain causal attention)."""
    kind = window_kind(T, w, device.type, kind)
    if kind is None:
        return None
    if kind == "dense":
        return Window("dense", w, mask=dense_mask(T, w, device))
    if not T % CHUNK == 0:
        raise ValueError(f"the {kind} window needs a length divisible by {CHUNK}, got {T}")
    if kind == "chunked":
        # Additive and 4-D: a boolean mask is converted at every call, a 3-D one sends SDPA to its
        # unfused math path on a CPU.
        allowed = _chunk_mask(T, w, device).repeat(n_heads, 1, 1)[None]
        return Window("chunked", w, mask=torch.zeros(allowed.shape, device=device).masked_fill(~allowed, -math.inf))
    if kind == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def in_window(b, h, q, k):
            return (q >= k) & (q - k < w)

        return Window("flex", w, block_mask=create_block_mask(in_window, None, None, T, T, device=device,
                                                              BLOCK_SIZE=CHUNK))
    raise ValueError(f"unknown window kind {kind!r}; use auto, dense, chunked or flex")


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Window) -> torch.Tensor:
    """Sliding-window causal attention of (B, H, T, Dh) queries, keys and values."""
    if window.kind == "dense":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=window.mask)
    if window.kind == "flex":
        # Dense buffers first: inside a compiled model q and k are strided views of the RoPE's
        # output, and inductor's CPU FlexAttention template silently returns wrong numbers for them
        # (torch 2.13, tests/test_attention.py). The copies cost little next to the attention.
        return _flex_attention()(q.contiguous(), k.contiguous(), v.contiguous(), block_mask=window.block_mask)
    B, H, T, Dh = q.shape
    n, p = T // CHUNK, windowed_keys(window.size) // CHUNK - 1
    y = F.scaled_dot_product_attention(q.reshape(B, H * n, CHUNK, Dh), _blocks_before(k, n, p),
                                       _blocks_before(v, n, p), attn_mask=window.mask.to(q.dtype))
    return y.view(B, H, T, Dh)


def _blocks_before(x: torch.Tensor, n: int, p: int) -> torch.Tensor:
    """(B, H, T, Dh) -> (B, H * n, (p + 1) * CHUNK, Dh): each block's keys, the p blocks before it
    first (zeros before the start, which the mask hides)."""
    B, H, T, Dh = x.shape
    blocks = F.pad(x.reshape(B, H, n, CHUNK, Dh), (0, 0, 0, 0, p, 0))
    return torch.cat([blocks[:, :, i:i + n] for i in range(p + 1)], dim=3).reshape(B, H * n, (p + 1) * CHUNK, Dh)


def _chunk_mask(T: int, w: int, device: torch.device) -> torch.Tensor:
    """(blocks, CHUNK, keys per block): query and key positions of each block, in the window and >= 0."""
    n, keys = T // CHUNK, windowed_keys(w)
    start = torch.arange(n, device=device)[:, None, None] * CHUNK
    q = start + torch.arange(CHUNK, device=device)[None, :, None]
    k = start - (keys - CHUNK) + torch.arange(keys, device=device)[None, None, :]
    return (q - k >= 0) & (q - k < w) & (k >= 0)


@functools.cache
def _flex_attention():
    """FlexAttention compiled once (uncompiled it runs a slow reference implementation)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)

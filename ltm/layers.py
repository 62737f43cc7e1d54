"""The building blocks the decoder (`ltm/model.py`) and the posterior encoder (`ltm/start.py`) share:
rotary position embeddings and the SwiGLU feed-forward layer."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltm.config import ModelConfig


def rope_angles(head_dim: int, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotations e^(i * pos * freq) as (cos, sin) pairs, shape (len(positions), head_dim // 2, 2)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x's last dimension (..., T, head_dim) by its T positions' rotations.

    Eager: one complex multiply, several times faster on a CPU than the rotate-half form's split
    and cat. Under torch.compile the same rotation in real arithmetic, which inductor fuses (it
    has no complex kernels)."""
    if torch.compiler.is_compiling():
        cos, sin = rotation.unbind(-1)
        even, odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).to(x.dtype)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.view_as_complex(rotation)).flatten(-2).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # Two matmuls rather than one fused one: the halves of a fused output are strided
        # views, which makes the elementwise gate and its backward twice as slow on a CPU.
        self.gate = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))

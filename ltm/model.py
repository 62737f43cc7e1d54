"""The decoder of a Latent Thought Model and its autoregressive twin, in one file.

    h   = x + SelfAttn(RMSNorm(x))          causal, sliding window, RoPE
    h   = h + CrossAttn(RMSNorm(h), z_l)    LTM only: queries from tokens, keys/values from
                                            this layer's own latent vectors, no mask
    out = h + SwiGLU(RMSNorm(h))

Pre-norm, no biases, no dropout, tied input/output embeddings (docs/METHOD.md section 1). RoPE and
SwiGLU live in `ltm/layers.py`, shared with the posterior encoder of `ltm/start.py`.
The AR baseline (kind="ar") is the same module with the cross-attention removed.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltm.attention import Window, plan_window, window_attention
from ltm.config import InferenceConfig, ModelConfig
from ltm.layers import SwiGLU, apply_rope, rope_angles
from ltm.start import build_start


class Stem(NamedTuple):
    """The z-independent start of a forward pass and the position data the rest reuses."""

    h: torch.Tensor
    rope: torch.Tensor
    window: Window | None


class KVCache:
    """Per-layer keys/values for incremental decoding: the last `window` self-attention keys
    and the latent keys/values (computed once, since z is fixed while decoding)."""

    def __init__(self, n_layers: int) -> None:
        self.pos = 0
        self.self_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.latent_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.o = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, window: Window | None,
                cache: KVCache | None) -> torch.Tensor:
        B, T, d = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.cfg.n_heads, self.cfg.head_dim).transpose(1, 3)  # (B, H, 3, T, Dh)
        q, k = apply_rope(qkv[:, :, :2], rope).unbind(2)  # q and k rotated in one call
        v = qkv[:, :, 2]
        if cache is not None:
            past = cache.self_kv[self.layer]
            if past is not None:
                if T != 1:
                    raise ValueError("incremental decoding takes one token at a time after the prompt")
                keep = self.cfg.attn_window - 1  # the new token plus the window-1 before it
                k = torch.cat((past[0][:, :, past[0].shape[2] - keep:] if keep else past[0][:, :, :0], k), dim=2)
                v = torch.cat((past[1][:, :, past[1].shape[2] - keep:] if keep else past[1][:, :, :0], v), dim=2)
            cache.self_kv[self.layer] = (k, v)
        if window is not None:
            y = window_attention(q, k, v, window)
        else:  # causal, or a single query that may see every cached key (the cache keeps the window)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        return self.o(y.transpose(1, 2).reshape(B, T, d))


class LatentCrossAttention(nn.Module):
    """Tokens attend to their layer's latent vectors z_l (no mask, no norm on z)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)
        self.o = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, h: torch.Tensor, z_l: torch.Tensor, rope: torch.Tensor,
                latent_rope: torch.Tensor | None, cache: KVCache | None) -> torch.Tensor:
        B, T, d = h.shape
        H, Dh = self.cfg.n_heads, self.cfg.head_dim
        q = self.q(h).view(B, T, H, Dh).transpose(1, 2)
        kv = cache.latent_kv[self.layer] if cache is not None else None
        if kv is None:
            k, v = self.kv(z_l).view(B, -1, 2, H, Dh).permute(2, 0, 3, 1, 4)
            if latent_rope is not None:
                k = apply_rope(k, latent_rope)
            kv = (k, v)
            if cache is not None:
                cache.latent_kv[self.layer] = kv
        if latent_rope is not None:
            q = apply_rope(q, rope)
        y = F.scaled_dot_product_attention(q, *kv)
        return self.o(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.norm_attn = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.attn = SelfAttention(cfg, layer)
        if cfg.kind == "ltm":
            self.norm_cross = nn.RMSNorm(cfg.d_model, eps=1e-5)
            self.cross = LatentCrossAttention(cfg, layer)
        self.norm_mlp = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.mlp = SwiGLU(cfg)

    def self_attention(self, x, rope, window, cache):
        return x + self.attn(self.norm_attn(x), rope, window, cache)

    def latent_and_mlp(self, h, z_l, rope, latent_rope, cache):
        if z_l is not None:
            h = h + self.cross(self.norm_cross(h), z_l, rope, latent_rope, cache)
        return h + self.mlp(self.norm_mlp(h))


class LatentThoughtModel(nn.Module):
    """`model(tokens, z)` -> logits (B, T, vocab); z is (B, n_latents, d_model), None for kind="ar"."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.norm_out = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.unembed = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.unembed.weight = self.embed.weight  # weight tying
        self.attention = "auto"
        """How the sliding window is computed: "auto", "dense", "chunked", "flex" (`ltm.attention`)."""
        self.start: nn.Module | None = None
        """Where the posterior starts when slow learning trains it (`ltm.start`); None: the fixed start."""
        self._windows: dict[tuple, Window | None] = {}
        self._init_weights()

    def _init_weights(self) -> None:
        # N(0, 0.02); residual output projections scaled by 1/sqrt(2L) (GPT-2).
        out_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                is_out = name.endswith(("attn.o.weight", "cross.o.weight", "mlp.down.weight"))
                nn.init.normal_(p, mean=0.0, std=out_std if is_out else self.cfg.init_std)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied embedding counted once); optionally without the embedding."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    # -- the forward pass, split where z first enters -------------------------------------

    def forward(self, tokens: torch.Tensor, z: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits for next-token prediction at every position of `tokens` (B, T)."""
        return self.forward_from_stem(self.stem(tokens, cache), z, cache)

    def stem(self, tokens: torch.Tensor, cache: KVCache | None = None) -> Stem:
        """Embedding and the first block's self-attention: the part of the pass that does not
        depend on z, so the inference loop computes it once instead of T times."""
        B, T = tokens.shape
        if tokens.dtype != torch.long:
            raise TypeError(f"tokens must be int64 (torch.long), got {tokens.dtype}")
        if cache is None and T > self.cfg.ctx:
            raise ValueError(f"sequence of {T} tokens is longer than model.ctx={self.cfg.ctx}")
        start = cache.pos if cache is not None else 0
        rope = self._rope_angles(start, T, tokens.device)
        window = self._window(T, tokens.device) if start == 0 else None
        h = self.blocks[0].self_attention(self.embed(tokens), rope, window, cache)
        return Stem(h, rope, window)

    def forward_from_stem(self, stem: Stem, z: torch.Tensor | None,
                          cache: KVCache | None = None) -> torch.Tensor:
        """Finish the forward pass from `stem`'s output."""
        cfg = self.cfg
        h = stem.h
        zs = self._split_latents(z, h.shape[0])
        latent_rope = self._latent_rope(h.device) if cfg.latent_rope and cfg.kind == "ltm" else None
        for layer, block in enumerate(self.blocks):
            if layer > 0:
                h = block.self_attention(h, stem.rope, stem.window, cache)
            h = block.latent_and_mlp(h, zs[layer], stem.rope, latent_rope, cache)
        if cache is not None:
            cache.pos += h.shape[1]
        return self.unembed(self.norm_out(h))

    # -- helpers ---------------------------------------------------------------------------

    def _split_latents(self, z: torch.Tensor | None, batch: int) -> list[torch.Tensor | None]:
        cfg = self.cfg
        if cfg.kind == "ar":
            if z is not None:
                raise ValueError("an AR model takes no latents: call model(tokens, None)")
            return [None] * cfg.n_layers
        expected = (batch, cfg.n_latents, cfg.d_model)
        if z is None or tuple(z.shape) != expected:
            got = None if z is None else tuple(z.shape)
            raise ValueError(f"an LTM needs z of shape {expected} (batch, n_latents, d_model), got {got}")
        return list(z.unflatten(1, (cfg.n_layers, cfg.latents_per_layer)).unbind(1))

    def _rope_angles(self, start: int, length: int, device: torch.device):
        positions = torch.arange(start, start + length, device=device)
        return rope_angles(self.cfg.head_dim, positions, self.cfg.rope_theta)

    def latent_positions(self) -> torch.Tensor:
        """Released-code pseudo-positions of a layer's latents (latent_rope=True): latent j sits at
        j * (ctx // n_latents), n_latents the total over all layers, the same in every layer."""
        return torch.arange(self.cfg.latents_per_layer) * (self.cfg.ctx // self.cfg.n_latents)

    def _latent_rope(self, device: torch.device):
        positions = self.latent_positions().to(device)
        return rope_angles(self.cfg.head_dim, positions, self.cfg.rope_theta)

    def _window(self, T: int, device: torch.device) -> Window | None:
        """The sliding window of a length-T pass (made once per shape), or None when causal suffices."""
        if torch.compiler.is_compiling():  # traced into the graph: no cache for dynamo to guard on
            return plan_window(T, self.cfg.attn_window, self.cfg.n_heads, device, self.attention)
        key = (T, str(device), self.attention)
        if key not in self._windows:
            self._windows[key] = plan_window(T, self.cfg.attn_window, self.cfg.n_heads, device, self.attention)
        return self._windows[key]


def build_model(cfg: ModelConfig, inference: InferenceConfig | None = None) -> LatentThoughtModel:
    """The decoder for a ModelConfig (an LTM, or the AR baseline for kind="ar"), with the trainable
    posterior start that `inference.start` asks for ("learned", "encoder") as `model.start`."""
    model = LatentThoughtModel(cfg)
    model.start = build_start(cfg, inference)
    return model


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood in nats, shape (B, T), computed in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)

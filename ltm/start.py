"""Where each sequence's posterior q(z) starts before the inference loop refines it (`inference.start`).

* "fixed" (the paper's): mu ~ N(0, init_mu_std^2), logvar ~ N(init_logvar, init_logvar_std^2), no parameters.
* "learned": the same draw around a per-latent centre (mu0, logvar0) that slow learning trains;
  it starts at the fixed start's centre (0, init_logvar).
* "encoder" (semi-amortised, Kim et al. 2018): n_latents learned queries read a shallow bidirectional
  encoding of the whole block and predict (mu, logvar); its output layer starts at zero, so before
  training it too predicts the fixed start's centre. The encoder reads the decoder's token embeddings
  detached: it has no path into the decoder's weights.

Both trained starts learn from the negative ELBO at their own output (`start_loss`), with the decoder
frozen for that term, so the decoder still learns from the refined z_T alone (docs/METHOD.md section 4).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltm.config import InferenceConfig, ModelConfig
from ltm.layers import SwiGLU, apply_rope, rope_angles


class LearnedStart(nn.Module):
    """A per-latent (mu0, logvar0), the same for every sequence."""

    def __init__(self, cfg: ModelConfig, inference: InferenceConfig) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(cfg.n_latents, cfg.d_model))
        self.logvar = nn.Parameter(torch.full((cfg.n_latents, cfg.d_model), inference.init_logvar))

    def forward(self, tokens: torch.Tensor, embed: nn.Embedding) -> tuple[torch.Tensor, torch.Tensor]:
        B = tokens.shape[0]
        return self.mu.expand(B, -1, -1), self.logvar.expand(B, -1, -1)


class _EncoderLayer(nn.Module):
    """Pre-norm bidirectional self-attention (RoPE, no mask) and SwiGLU."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm_attn = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.o = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm_mlp = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        B, S, d = x.shape
        qkv = self.qkv(self.norm_attn(x)).view(B, S, 3, self.cfg.n_heads, self.cfg.head_dim).transpose(1, 3)
        q, k = apply_rope(qkv[:, :, :2], rope).unbind(2)
        y = F.scaled_dot_product_attention(q, k, qkv[:, :, 2])
        x = x + self.o(y.transpose(1, 2).reshape(B, S, d))
        return x + self.mlp(self.norm_mlp(x))


class BlockEncoder(nn.Module):
    """q(z | x) from the whole block: `encoder_layers` bidirectional layers, then n_latents learned
    queries cross-attend to the encoding, pass a SwiGLU, and a linear layer gives (mu, logvar)."""

    def __init__(self, cfg: ModelConfig, inference: InferenceConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(_EncoderLayer(cfg) for _ in range(inference.encoder_layers))
        self.norm_keys = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.queries = nn.Parameter(torch.randn(cfg.n_latents, cfg.d_model) * cfg.init_std)
        self.norm_q = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model, bias=False)
        self.o = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm_mlp = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.mlp = SwiGLU(cfg)
        self.norm_out = nn.RMSNorm(cfg.d_model, eps=1e-5)
        self.out = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        for name, p in self.named_parameters():
            if p.dim() == 2 and name != "queries":
                nn.init.normal_(p, std=cfg.init_std)
        # At initialisation the encoder predicts the fixed start's centre: mu 0, logvar init_logvar.
        nn.init.zeros_(self.out.weight)
        with torch.no_grad():
            self.out.bias.copy_(torch.cat((torch.zeros(cfg.d_model),
                                           torch.full((cfg.d_model,), inference.init_logvar))))

    def forward(self, tokens: torch.Tensor, embed: nn.Embedding) -> tuple[torch.Tensor, torch.Tensor]:
        B, S = tokens.shape
        cfg = self.cfg
        rope = rope_angles(cfg.head_dim, torch.arange(S, device=tokens.device), cfg.rope_theta)
        x = embed(tokens).detach()
        for layer in self.layers:
            x = layer(x, rope)
        k, v = self.kv(self.norm_keys(x)).view(B, S, 2, cfg.n_heads, cfg.head_dim).permute(2, 0, 3, 1, 4)
        h = self.queries.expand(B, -1, -1)
        q = self.q(self.norm_q(h)).view(B, -1, cfg.n_heads, cfg.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        h = h + self.o(y.transpose(1, 2).reshape(B, -1, cfg.d_model))
        h = h + self.mlp(self.norm_mlp(h))
        mu, logvar = self.out(self.norm_out(h)).chunk(2, dim=-1)
        return mu, logvar


def build_start(cfg: ModelConfig, inference: InferenceConfig | None) -> nn.Module | None:
    """The trainable start module of an LTM, or None for the fixed start (and for AR models)."""
    if cfg.kind != "ltm" or inference is None or inference.start == "fixed":
        return None
    return LearnedStart(cfg, inference) if inference.start == "learned" else BlockEncoder(cfg, inference)


NO_DECAY = ("start.mu", "start.logvar")
"""Parameters that are a distribution's centre, not weights: no weight decay (it would pull them to 0)."""

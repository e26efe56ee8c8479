"""A LLaMA-style decoder: RMSNorm, rotary embeddings, SwiGLU MLP, tied or untied head.

Module names follow the GaLore recipe's targets: every attention Linear lives under
`layers.<i>.attn` and every MLP Linear under `layers.<i>.mlp`, so
`param_groups(model, targets=("attn", "mlp"))` projects exactly those.
The model can be built on the meta device (`device="meta"`) to count bytes without
allocating them, which is what the memory planner does for the 7B shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int = 256          # byte-level tokenizer of the embedded corpus
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention when < n_heads
    ffn_dim: int = 344             # SwiGLU hidden size; LLaMA uses ~8/3·dim
    max_seq_len: int = 1024        # rotary table length
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_embeddings: bool = False   # LLaMA unties the head
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


# The paper sizes are the LLaMA shapes of GaLore's configs/llama_*.json (T5 tokenizer,
# vocab 32000); "tiny" is a byte-level model that trains on 2 CPU cores in ~2 minutes.
MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(),
    "60m": ModelConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, ffn_dim=1376),
    "130m": ModelConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, ffn_dim=2048),
    "350m": ModelConfig(vocab_size=32000, dim=1024, n_layers=24, n_heads=16, ffn_dim=2736),
    "1b": ModelConfig(vocab_size=32000, dim=2048, n_layers=24, n_heads=32, ffn_dim=5461),
    "7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, ffn_dim=11008),
}


def model_config(preset: str | None = None, **overrides) -> ModelConfig:
    base = MODEL_PRESETS[preset] if preset else ModelConfig()
    return replace(base, **overrides)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32: under bf16 autocast the mean of squares loses ~3 digits
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rotary_table(head_dim: int, length: int, theta: float, device=None) -> torch.Tensor:
    """cos/sin of the rotary angles, shape (length, head_dim/2, 2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rotary(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x (batch, heads, seq, head_dim) by the table's angles."""
    pairs = rearrange(x.float(), "b h t (d two) -> b h t d two", two=2)
    cos, sin = table[: x.shape[2], :, 0], table[: x.shape[2], :, 1]
    real = pairs[..., 0] * cos - pairs[..., 1] * sin
    imag = pairs[..., 0] * sin + pairs[..., 1] * cos
    return rearrange(torch.stack((real, imag), dim=-1), "b h t d two -> b h t (d two)").type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", h=self.n_heads)
        k = rearrange(self.k_proj(x), "b t (h d) -> b h t d", h=self.kv_heads)
        v = rearrange(self.v_proj(x), "b t (h d) -> b h t d", h=self.kv_heads)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=self.kv_heads != self.n_heads)
        return self.o_proj(rearrange(out, "b h t d -> b t (h d)"))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Decoder-only LLaMA. `forward(tokens, targets)` returns the mean cross-entropy."""

    def __init__(self, cfg: ModelConfig, *, activation_checkpointing: bool = False):
        super().__init__()
        if cfg.dim % cfg.n_heads or cfg.n_heads % cfg.kv_heads or cfg.head_dim % 2:
            raise ValueError(f"dim {cfg.dim} must split into {cfg.n_heads} heads of even size "
                             f"and n_heads must be a multiple of n_kv_heads {cfg.kv_heads}")
        self.cfg = cfg
        self.activation_checkpointing = activation_checkpointing
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("rope", rotary_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta),
                             persistent=False)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """GPT-2/LLaMA init: N(0, 0.02); output projections scaled by 1/sqrt(2·layers)."""
        out_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    std = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) \
                        else self.cfg.init_std
                    p.copy_(torch.randn(p.shape, generator=generator) * std)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, self.rope, use_reentrant=False)
            else:
                x = layer(x, self.rope)
        x = self.norm(x)
        return x @ self.embed.weight.T if self.head is None else self.head(x)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.logits(tokens)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def build_model(cfg: ModelConfig, *, seed: int = 0, device: str | torch.device = "cpu",
                activation_checkpointing: bool = False) -> nn.Module:
    """The model with seeded init; on "meta" nothing is allocated (shapes only).
    An `HFModelSpec` (`[model] hf_config` / `hf_pretrained`) builds a transformers model."""
    if not isinstance(cfg, ModelConfig):
        from .hfmodel import build_hf_model
        return build_hf_model(cfg, seed=seed, device=device,
                              activation_checkpointing=activation_checkpointing)
    with torch.device(device):
        model = Llama(cfg, activation_checkpointing=activation_checkpointing)
    if str(device) != "meta":
        gen = torch.Generator().manual_seed(seed)
        model.reset_parameters(gen)  # init on CPU with its own generator: same weights anywhere
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

"""arcface_torch's face Vision Transformer (112x112 input, 9x9 patches -> 144 tokens).

No class token: the final LayerNorm's 144 token vectors are flattened and projected by
Linear(dim*144 -> dim) -> BN1d -> Linear(dim -> num_features) -> BN1d. During training a fraction
of the tokens is dropped before the blocks and replaced by a learned mask token after the norm.
Key names match insightface's published weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backbones.common import check_input, fp32_region, run_block, trunk_autocast

IMAGE_SIZE = 112
PATCH_SIZE = 9
NUM_HEADS = 8

VIT_VARIANTS = {
    # name: (embed dim, depth, drop-path rate, mask ratio)
    "vit_t": (256, 12, 0.1, 0.1),
    "vit_t_dp005_mask0": (256, 12, 0.05, 0.0),
    "vit_s": (512, 12, 0.1, 0.1),
    "vit_s_dp005_mask_0": (512, 12, 0.05, 0.0),
    "vit_b": (512, 24, 0.1, 0.1),
    "vit_b_dp005_mask_005": (512, 24, 0.05, 0.05),
    "vit_l": (768, 24, 0.1, 0.1),
    "vit_l_dp005_mask_005": (768, 24, 0.05, 0.05),
}


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability ``rate`` (training only)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop the whole residual branch per sample with probability ``rate`` (training only)."""
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        """Shown by ``print(model)``."""
        return f"rate={self.rate}"


class Mlp(nn.Module):
    """Transformer feed-forward: Linear, ReLU6, Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()  # insightface's face ViT uses ReLU6, not GELU
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Feed-forward of every token."""
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention; the softmax(QK^T)V part always runs in float32 (as arcface_torch)."""

    def __init__(self, dim: int, num_heads: int = NUM_HEADS) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention over the tokens."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        with fp32_region(x):
            # Fused kernel (flash / memory-efficient on GPUs); default scale is head_dim ** -0.5.
            out = F.scaled_dot_product_attention(qkv[0].float(), qkv[1].float(), qkv[2].float())
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out)

    def matmul_macs(self, batch: int, tokens: int, dim: int) -> int:
        """Multiply-accumulates of QK^T and attn@V (invisible to module hooks); used by tools/flops.py."""
        return 2 * batch * tokens * tokens * dim


class Block(nn.Module):
    """Pre-norm transformer block: attention and MLP, each with drop-path."""

    def __init__(self, dim: int, drop_path: float, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Both residual branches."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens (one strided conv)."""

    def __init__(self, dim: int, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE) -> None:
        super().__init__()
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens [N, patches, dim] of images [N, 3, H, W]."""
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """arcface_torch's face ViT (``vit_t`` ... ``vit_l``): patch tokens, a random share of them masked in training, all
    tokens flattened into the embedding layer.
    """

    def __init__(self, embed_dim: int, depth: int, num_features: int = 512, drop_path_rate: float = 0.1,
                 mask_ratio: float = 0.1, fp16: bool = False, gradient_checkpointing: bool = False,
                 name: str = "vit") -> None:
        super().__init__()
        self.name = name
        self.fp16 = fp16
        self.gradient_checkpointing = gradient_checkpointing
        self.embed_dim = embed_dim
        self.mask_ratio = mask_ratio
        self.patch_embed = PatchEmbed(embed_dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, embed_dim))
        # Drop-path rate grows linearly with depth (plain floats: the model may be built on "meta").
        rates = [drop_path_rate * index / max(depth - 1, 1) for index in range(depth)]
        self.blocks = nn.ModuleList([Block(embed_dim, rate) for rate in rates])
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * self.num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=2e-5),
            nn.Linear(embed_dim, num_features, bias=False),
            nn.BatchNorm1d(num_features, eps=2e-5),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-2.0, b=2.0)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _drop_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random (1 - mask_ratio) subset of tokens per sample; also return the restoring order."""
        batch, tokens, dim = x.shape
        num_keep = int(tokens * (1 - self.mask_ratio))
        order = torch.argsort(torch.rand(batch, tokens, device=x.device), dim=1)
        restore = torch.argsort(order, dim=1)
        kept = torch.gather(x, 1, order[:, :num_keep, None].expand(-1, -1, dim))
        return kept, restore

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings [N, num_features] of normalised images [N, 3, 112, 112]."""
        check_input(x, self.name)
        batch = x.shape[0]
        masking = self.training and self.mask_ratio > 0
        use_checkpoint = self.gradient_checkpointing and self.training
        with trunk_autocast(x, self.fp16):
            x = self.patch_embed(x) + self.pos_embed
            if masking:
                x, restore = self._drop_tokens(x)
            for block in self.blocks:
                x = run_block(block, x, use_checkpoint)
        with fp32_region(x):
            x = self.norm(x.float())
            if masking:
                # Dropped positions get the learned mask token (after the norm, as arcface_torch).
                fill = self.mask_token.expand(batch, self.num_patches - x.shape[1], -1)
                x = torch.cat([x, fill], dim=1)
                x = torch.gather(x, 1, restore[:, :, None].expand(-1, -1, self.embed_dim))
            return self.feature(x.reshape(batch, self.num_patches * self.embed_dim))


def build_vit(name: str, drop_path_rate: float | None = None, mask_ratio: float | None = None,
              **kwargs) -> VisionTransformer:
    """The registered ViT variant ``name``; drop-path and mask rates default to the variant's."""
    dim, depth, default_drop_path, default_mask = VIT_VARIANTS[name]
    return VisionTransformer(dim, depth, name=name,
                             drop_path_rate=default_drop_path if drop_path_rate is None else drop_path_rate,
                             mask_ratio=default_mask if mask_ratio is None else mask_ratio, **kwargs)

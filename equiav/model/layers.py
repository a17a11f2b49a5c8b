"""Small building blocks shared by the encoders, the predictor and the heads."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["QuickGELU", "init_xavier_"]


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): CLIP's GELU approximation, used by the augmentation encoder
    (method.md section 4; kept rather than the exact GELU so released weights compute the same)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def init_xavier_(module: nn.Module) -> None:
    """The release's initialisation, for use with ``Module.apply``: Xavier-uniform Linear
    weights (as in the JAX ViT) with zero biases, LayerNorm weight 1 and bias 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

"""Projection heads (method.md section 5)."""

from __future__ import annotations

from torch import Tensor, nn

from equiav.model.layers import init_xavier_

__all__ = ["ProjectionHead"]


class ProjectionHead(nn.Module):
    """Linear(D, H) - LN - ReLU - Linear(H, H) - LN - ReLU - Linear(H, E) - LN: [..., D] -> [..., E].

    The output is not L2-normalised; the losses normalise. EquiAV has four of these
    (intra / inter x audio / visual), 768 -> 2048 -> 2048 -> 512 at ViT-B size.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.fc3 = nn.Linear(hidden_dim, out_dim)
        self.norm3 = nn.LayerNorm(out_dim)
        self.act = nn.ReLU()
        self.apply(init_xavier_)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.norm1(self.fc1(x)))
        x = self.act(self.norm2(self.fc2(x)))
        return self.norm3(self.fc3(x))

"""The two ViT towers (method.md section 2).

Each tower is a plain pre-norm ViT built from timm's ``Block`` (fused scaled-dot-product
attention) and ``PatchEmbed``, with

* fixed 2-D sin-cos positional embeddings for its own patch grid (a non-persistent buffer: not
  trained, not in the state dict, never loaded from MAE),
* a learnable modality embedding [1, 1, D] ~ N(0, 0.02) added to every token,
* no CLS token (every pooled feature is the mean over patch tokens),
* a final LayerNorm, and a second final LayerNorm used only for the augmented view (the
  release's ``norm_a_aug`` / ``norm_v_aug``); both views share the patch embedding and blocks.

Every LayerNorm uses PyTorch's default eps = 1e-5, as the release does (timm's ViT and MAE use
1e-6); keeping the release's value makes converted release checkpoints compute the same.
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from equiav.model.layers import init_xavier_
from equiav.settings.model import ModelConfig

__all__ = ["AudioEncoder", "ViTEncoder", "View", "VisualEncoder", "sincos_pos_embed_2d"]

View = Literal["clean", "augmented"]


def sincos_pos_embed_2d(embed_dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D sin-cos positional embedding, [rows * cols, embed_dim] in float32.

    Token ``i`` sits at row ``i // cols`` and column ``i % cols`` (the order of a flattened
    Conv2d patch grid). Its first ``embed_dim / 2`` channels encode the column and the last
    ``embed_dim / 2`` the row, each as [sin(p * w_k), cos(p * w_k)] for
    w_k = 10000^(-k / (embed_dim / 4)), k = 0 .. embed_dim/4 - 1. This is MAE's layout
    (column first), which the release uses for both grids.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for 2-D sin-cos positions, got {embed_dim}")
    rows, cols = grid
    quarter = embed_dim // 4
    # float64 like MAE's numpy code, so the values match it to float32 rounding.
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    row, col = torch.meshgrid(
        torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64), indexing="ij"
    )

    def encode(position: Tensor) -> Tensor:
        angles = position.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(col), encode(row)], dim=1).float()


class ViTEncoder(nn.Module):
    """A ViT tower over an image-like input [B, in_chans, H, W] -> tokens [B, L, D].

    L = (H / patch_size) * (W / patch_size). Subclasses fix the input layout per modality;
    use :class:`AudioEncoder` and :class:`VisualEncoder` rather than this class directly.

    Args:
        in_chans: input channels (1 for a spectrogram, 3 for RGB).
        input_size: (H, W) in pixels; both multiples of ``patch_size``.
        augmented_view: build the second final LayerNorm (``norm_aug``) for augmented inputs.
            Pre-training needs it; the fine-tuning classifier, which sees clean inputs only,
            does not build it (an unused parameter would break DDP without
            ``find_unused_parameters``).
    """

    def __init__(
        self,
        *,
        in_chans: int,
        input_size: tuple[int, int],
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        patch_size: int,
        drop_path: float = 0.0,
        augmented_view: bool = True,
    ) -> None:
        super().__init__()
        height, width = input_size
        if height % patch_size or width % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size={patch_size}")
        self.input_size = (height, width)
        self.grid = (height // patch_size, width // patch_size)
        self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(
            img_size=self.input_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
        )
        self.register_buffer("pos_embed", sincos_pos_embed_2d(embed_dim, self.grid).unsqueeze(0), persistent=False)
        self.modality_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                drop_path=drop_path,
                norm_layer=nn.LayerNorm,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.norm_aug = nn.LayerNorm(embed_dim) if augmented_view else None
        self.grad_checkpointing = False
        self.init_weights()

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def init_weights(self) -> None:
        """The release's initialisation (MAE weights, when wanted, are loaded afterwards)."""
        self.apply(init_xavier_)
        # The patch projection is a Linear on flattened patches: initialise it like one.
        weight = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.modality_embed, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward pass instead of storing its activations."""
        self.grad_checkpointing = enable

    def to_image(self, x: Tensor) -> Tensor:
        """The modality's input layout -> [B, in_chans, H, W]; overridden per modality."""
        return x

    def forward_image(self, image: Tensor) -> Tensor:
        """[B, in_chans, H, W] -> tokens [B, L, D] after the blocks, before any final norm."""
        x = self.patch_embed(image) + self.pos_embed + self.modality_embed
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward(self, x: Tensor, view: View = "clean") -> Tensor:
        """Input in the modality's layout -> tokens [B, L, D] after the view's final norm."""
        return self._final_norm(view)(self.forward_image(self.to_image(x)))

    def forward_views(self, clean: Tensor, augmented: Tensor) -> tuple[Tensor, Tensor]:
        """Both views in one pass through the shared blocks (one batch of 2B: larger matmuls,
        the same result as two calls), each with its own final norm -> two [B, L, D]."""
        if clean.shape != augmented.shape:
            raise ValueError(
                f"clean and augmented inputs must have the same shape, got {tuple(clean.shape)} "
                f"and {tuple(augmented.shape)}"
            )
        tokens = self.forward_image(self.to_image(torch.cat([clean, augmented])))
        clean_tokens, augmented_tokens = tokens.chunk(2)
        return self.norm(clean_tokens), self._final_norm("augmented")(augmented_tokens)

    def _final_norm(self, view: View) -> nn.LayerNorm:
        if view == "clean":
            return self.norm
        if view == "augmented":
            if self.norm_aug is None:
                raise ValueError("this encoder was built with augmented_view=False and has no norm_aug")
            return self.norm_aug
        raise ValueError(f"view must be 'clean' or 'augmented', got {view!r}")


class AudioEncoder(ViTEncoder):
    """Audio tower. Input: normalised log-mel spectrograms [B, T, F] as the data loader gives
    them (time frames x mel bins, T = ``audio_frames``, F = ``audio_freq_bins``).

    Internally the spectrogram is transposed to a one-channel image [B, 1, F, T] (frequency
    rows, time columns), so a 128 x 1024 input gives an 8 x 64 grid = 512 tokens.
    """

    def __init__(self, config: ModelConfig, *, augmented_view: bool = True) -> None:
        super().__init__(
            in_chans=1,
            input_size=(config.audio_freq_bins, config.audio_frames),
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            patch_size=config.patch_size,
            drop_path=config.drop_path,
            augmented_view=augmented_view,
        )

    def to_image(self, x: Tensor) -> Tensor:
        freq_bins, frames = self.input_size
        if x.ndim != 3 or tuple(x.shape[1:]) != (frames, freq_bins):
            hint = ""
            if x.ndim == 3 and tuple(x.shape[1:]) == (freq_bins, frames):
                hint = "; it looks like [B, F, T]: pass spectrograms as [B, T, F] (time first)"
            elif x.ndim == 3 and x.shape[2] == freq_bins:
                hint = (
                    f"; pad or trim the time axis to {frames} frames "
                    f"(or build the model with audio_frames={x.shape[1]})"
                )
            raise ValueError(f"audio must be [B, T={frames}, F={freq_bins}], got {tuple(x.shape)}{hint}")
        return x.transpose(1, 2).unsqueeze(1)


class VisualEncoder(ViTEncoder):
    """Visual tower. Input: ImageNet-normalised frames [B, 3, S, S], S = ``image_size``
    (224 gives a 14 x 14 grid = 196 tokens)."""

    def __init__(self, config: ModelConfig, *, augmented_view: bool = True) -> None:
        super().__init__(
            in_chans=3,
            input_size=(config.image_size, config.image_size),
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=config.mlp_ratio,
            patch_size=config.patch_size,
            drop_path=config.drop_path,
            augmented_view=augmented_view,
        )

    def to_image(self, x: Tensor) -> Tensor:
        expected = (3, *self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"visual input must be [B, 3, {expected[1]}, {expected[2]}], got {tuple(x.shape)}")
        return x

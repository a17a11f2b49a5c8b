"""The transformation predictor u(h, t) (method.md section 4) and its ablation variants.

Every variant maps the encoder's clean output tokens h [B, L, D] (after the final norm) and
augmentation parameters t [B, S, d_t] to one prediction per parameter vector ("slot"),
[B, S, D], and returns the mean over the S slots, [B, D]:

* S = 1 (or t given as [B, d_t]): the predicted feature of the augmented view, u(h, t);
* S random vectors: the centroid of the predictions over the augmentation distribution, the
  inter-modal feature of the paper, taken in the D-dimensional feature space.

The slots never interact, so a call with S vectors equals the mean of S calls with one each.
All variants first embed t with the same augmentation encoder; one predictor per modality is
shared by the intra- and inter-modal paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from equiav.model.layers import QuickGELU, init_xavier_
from equiav.settings.model import ModelConfig

__all__ = [
    "AugmentationEncoder",
    "CrossAttention",
    "CrossAttentionPredictor",
    "HypernetworkPredictor",
    "LinearPredictor",
    "TransformationPredictor",
    "build_predictor",
]


class AugmentationEncoder(nn.Module):
    """Linear(d_t, A) - QuickGELU - Linear(A, A) - QuickGELU - Linear(A, A): [..., d_t] -> [..., A].

    The parameter vectors are fed as they are, without normalisation (method.md section 4).
    """

    def __init__(self, param_dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(param_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.act = QuickGELU()

    def forward(self, params: Tensor) -> Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(params)))))


class CrossAttention(nn.Module):
    """Multi-head attention of S queries over L key/value tokens.

    q = Linear(query_dim, H * d_h), k, v = Linear(kv_dim, H * d_h) (all with bias), softmax over
    the L tokens with the usual 1 / sqrt(d_h) scale, output Linear(H * d_h, kv_dim, no bias).
    [B, S, query_dim], [B, L, kv_dim] -> [B, S, kv_dim].
    """

    def __init__(self, query_dim: int, kv_dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.q = nn.Linear(query_dim, inner)
        self.k = nn.Linear(kv_dim, inner)
        self.v = nn.Linear(kv_dim, inner)
        self.proj = nn.Linear(inner, kv_dim, bias=False)

    def forward(self, queries: Tensor, tokens: Tensor) -> Tensor:
        def heads(x: Tensor) -> Tensor:  # [B, N, H * d_h] -> [B, H, N, d_h]
            return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(queries)), heads(self.k(tokens)), heads(self.v(tokens)))
        return self.proj(out.transpose(1, 2).flatten(2))


class TransformationPredictor(nn.Module):
    """Base class: validates the inputs, embeds the parameters and averages the slots.

    Subclasses implement :meth:`predict_slots`.
    """

    def __init__(self, embed_dim: int, param_dim: int, aug_hidden: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.param_dim = param_dim
        self.aug_encoder = AugmentationEncoder(param_dim, aug_hidden)

    def forward(self, tokens: Tensor, params: Tensor) -> Tensor:
        """tokens [B, L, D], params [B, d_t] or [B, S, d_t] -> prediction [B, D] (mean over S)."""
        return self.predict_slots(tokens, self.aug_encoder(self._check(tokens, params))).mean(dim=1)

    def predict_slots(self, tokens: Tensor, aug: Tensor) -> Tensor:
        """tokens [B, L, D], embedded parameters [B, S, A] -> one prediction per slot [B, S, D]."""
        raise NotImplementedError

    def _check(self, tokens: Tensor, params: Tensor) -> Tensor:
        if tokens.ndim != 3 or tokens.shape[-1] != self.embed_dim:
            raise ValueError(f"tokens must be [B, L, {self.embed_dim}], got {tuple(tokens.shape)}")
        if params.ndim == 2:
            params = params.unsqueeze(1)
        if params.ndim != 3 or params.shape[-1] != self.param_dim or params.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"augmentation parameters must be [B={tokens.shape[0]}, {self.param_dim}] or "
                f"[B={tokens.shape[0]}, S, {self.param_dim}], got {tuple(params.shape)}"
            )
        if params.shape[1] == 0:
            raise ValueError("augmentation parameters have S = 0 slots; give at least one vector per sample")
        # The data pipeline hands float32 vectors; follow the module's dtype (e.g. a bf16 model).
        return params.to(self.aug_encoder.fc1.weight.dtype)


class CrossAttentionPredictor(TransformationPredictor):
    """The paper's predictor: the embedded parameters query the tokens.

    Per slot: u0 = mean_L(h) + CrossAttention(LN_A(e), h); u = u0 + MLP(LN_D(u0)) with
    MLP = Linear(D, mlp_ratio * D) - GELU - Linear(mlp_ratio * D, D).
    """

    def __init__(
        self,
        embed_dim: int,
        param_dim: int,
        aug_hidden: int,
        num_heads: int,
        head_dim: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__(embed_dim, param_dim, aug_hidden)
        self.query_norm = nn.LayerNorm(aug_hidden)
        self.attn = CrossAttention(aug_hidden, embed_dim, num_heads, head_dim)
        self.norm = nn.LayerNorm(embed_dim)
        self.mlp = Mlp(embed_dim, int(embed_dim * mlp_ratio))
        self.apply(init_xavier_)

    def predict_slots(self, tokens: Tensor, aug: Tensor) -> Tensor:
        # The residual base is the pooled clean feature, broadcast over the S slots.
        u = tokens.mean(dim=1, keepdim=True) + self.attn(self.query_norm(aug), tokens)
        return u + self.mlp(self.norm(u))


class LinearPredictor(TransformationPredictor):
    """EquiMod's predictor (paper Table 6): per slot, Linear(D + A, D) on [mean_L(h) ; e]."""

    def __init__(self, embed_dim: int, param_dim: int, aug_hidden: int) -> None:
        super().__init__(embed_dim, param_dim, aug_hidden)
        self.proj = nn.Linear(embed_dim + aug_hidden, embed_dim)
        self.apply(init_xavier_)

    def predict_slots(self, tokens: Tensor, aug: Tensor) -> Tensor:
        pooled = tokens.mean(dim=1, keepdim=True).expand(-1, aug.shape[1], -1)
        return self.proj(torch.cat([pooled, aug], dim=-1))


class HypernetworkPredictor(TransformationPredictor):
    """SIE-style predictor (paper Table 6): the embedded parameters generate an affine map of
    the pooled feature x = mean_L(h).

    Per slot: u = x + U(e) (V(e)^T x) / sqrt(D) + b(e), with U(e), V(e) [D, r] and b(e) [D]
    produced by linear layers from e. A full D x D matrix per slot would need a generator of
    A * D^2 = 151 M weights at ViT-B size; the rank-r update around the identity needs
    2 A D r (3.1 M for r = 8). The 1 / sqrt(D) is the fan-in scaling of an ordinary Linear;
    with Xavier-initialised generators the update starts small (about 0.1 % of |x| at ViT-B
    size), so training starts from u = x + b(e).
    """

    def __init__(self, embed_dim: int, param_dim: int, aug_hidden: int, rank: int) -> None:
        super().__init__(embed_dim, param_dim, aug_hidden)
        self.rank = rank
        self.to_u = nn.Linear(aug_hidden, embed_dim * rank)
        self.to_v = nn.Linear(aug_hidden, embed_dim * rank)
        self.to_bias = nn.Linear(aug_hidden, embed_dim)
        self.apply(init_xavier_)

    def predict_slots(self, tokens: Tensor, aug: Tensor) -> Tensor:
        pooled = tokens.mean(dim=1)  # [B, D]
        u = self.to_u(aug).unflatten(-1, (self.embed_dim, self.rank))  # [B, S, D, r]
        v = self.to_v(aug).unflatten(-1, (self.embed_dim, self.rank))
        coefficients = torch.einsum("bsdr,bd->bsr", v, pooled) * self.embed_dim**-0.5
        return pooled.unsqueeze(1) + torch.einsum("bsdr,bsr->bsd", u, coefficients) + self.to_bias(aug)


def build_predictor(config: ModelConfig, param_dim: int) -> TransformationPredictor:
    """The predictor ``config.predictor`` names, for parameter vectors of length ``param_dim``."""
    if config.predictor == "cross_attention":
        return CrossAttentionPredictor(
            config.embed_dim,
            param_dim,
            config.aug_hidden,
            config.cross_heads,
            config.cross_head_dim,
            config.mlp_ratio,
        )
    if config.predictor == "linear":
        return LinearPredictor(config.embed_dim, param_dim, config.aug_hidden)
    if config.predictor == "hypernetwork":
        return HypernetworkPredictor(config.embed_dim, param_dim, config.aug_hidden, config.hypernetwork_rank)
    raise ValueError(f"unknown predictor {config.predictor!r}")

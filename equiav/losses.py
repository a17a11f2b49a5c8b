"""EquiAV's pre-training losses (spec ``method.md`` section 6; paper Eqs. 9, 10, 14-16).

Notation: B = local batch per process, W = world size, N = W*B global batch, E = embedding
width, tau = temperature (0.07, fixed). Every embedding is L2-normalised here, in float32 (or
float64 for float64 inputs) with autocast switched off, so bf16/fp16 training gets float32 logits.

Distributed design (both losses): the anchors / queries are the **local** rows only and the loss
of a process is the mean over its local anchors. Why this is the single-process objective: let
L_r be the loss on rank r and L = (1/N) sum_i l_i the single-process loss on the concatenated
batch. With equal local batches,

    (1/W) sum_r L_r = (1/W) sum_r (1/B) sum_{i on r} l_i = (1/N) sum_i l_i = L.

DDP averages parameter gradients, so with J_r the Jacobian of rank r's embeddings x_r w.r.t. the
parameters and g_r the gradient that reaches x_r, it applies (1/W) sum_r J_r^T g_r. That equals
dL/dtheta = sum_r J_r^T dL/dx_r exactly when

    g_r = W dL/dx_r = d(sum_r' L_r')/dx_r,

i.e. when x_r receives the gradient of **every** rank's loss, not only its own. Intra: x_r enters
the other ranks' losses as candidates, and the backward of ``gather_with_grad`` sums those
contributions over ranks. Inter: keys are detached, so no other rank's loss depends on x_r and
g_r = dL_r/dx_r is already the whole of it. In a test: the gradient that rank r's inputs receive,
divided by W, equals the single-process gradient w.r.t. the same rows (tests/test_losses.py).
The full 2N x 2N loss on every rank would satisfy the same identity (each rank then sends
dL/dx_r, summed W times) at W times the cost; what would break it is local anchors with a gather
that keeps only the local gradient, which drops what the other ranks' anchors send to x_r.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from equiav.distributed import gather_no_grad, gather_with_grad, rank

__all__ = ["EquiAVLoss", "InterModalLoss", "IntraModalLoss", "REQUIRED_OUTPUTS"]

# The model outputs EquiAVLoss reads, each [B, E].
REQUIRED_OUTPUTS: tuple[str, ...] = (
    "audio_equi",
    "audio_aug",
    "visual_equi",
    "visual_aug",
    "audio_inter",
    "visual_inter",
)


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {temperature!r}; the paper uses 0.07")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}; the paper uses 0.07")
    return float(temperature)


def _check_weight(name: str, weight: float) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TypeError(f"{name} must be a number, got {weight!r}; the paper uses 1.0")
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {weight!r}; the paper uses 1.0")
    return float(weight)


def _check_pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Both embeddings must be [B, E] with the same B >= 1 and E >= 1, on the same device."""
    for name, t in ((name_a, a), (name_b, b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [B, E], got {type(t).__name__}")
        if t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
            raise ValueError(f"{name} must have shape [B, E] with B, E >= 1, got {tuple(t.shape)}")
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape [B, E], got {tuple(a.shape)} and {tuple(b.shape)}; "
            "row i of both must come from the same clip"
        )
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; move both to one device")


@contextmanager
def _full_precision(device: torch.device) -> Iterator[None]:
    """Switch autocast off so that the matmuls below run in the inputs' (promoted) dtype.

    At tau = 0.07 a logit error of 1e-2 (bf16) is a relative error of ~1e-3 in exp(logit), and the
    masked, 2N-wide softmax is the whole signal: float32 costs nothing next to the encoders.
    """
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def _normalise(x: Tensor) -> Tensor:
    """[B, E] -> [B, E] unit rows, at least float32 (float64 stays float64 for exact tests)."""
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=1)


class IntraModalLoss(nn.Module):
    """Equivariant intra-modal contrastive loss of one modality (paper Eqs. 9-10).

    For every local i (global index g = rank*B + i), with s(x, y) = x.y / tau on unit vectors:

        anchor z^_g:  candidates = all N z' and the N-1 other z^;  positive = z'_g
        anchor z'_g:  candidates = all N z^ and the N-1 other z';  positive = z^_g

        NT-Xent (positive_in_denominator=True, the paper):
            l = -s(anchor, pos) + log sum_{c in candidates (2N-1)} exp s(anchor, c)
        EquiMod (positive_in_denominator=False, paper Table 8 / Eq. A):
            l = -s(anchor, pos) + log sum_{c in candidates, c != pos (2N-2)} exp s(anchor, c)

        L_intra = mean over the 2B local anchors = (mean of the z^ terms + mean of the z' terms) / 2

    z^ and z' are gathered **with** gradient, so negatives living on other ranks are pushed too.
    The EquiMod value can be negative and needs N >= 2 (with one clip there is no negative and
    the log of an empty sum is -inf); it is checked.

    Args:
        temperature: tau > 0 (0.07 in the paper; fixed, not learned).
        positive_in_denominator: True for NT-Xent (EquiAV), False for the EquiMod variant.
    """

    def __init__(self, temperature: float = 0.07, positive_in_denominator: bool = True) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)
        if not isinstance(positive_in_denominator, bool):
            raise TypeError(f"positive_in_denominator must be a bool, got {positive_in_denominator!r}")
        self.positive_in_denominator = positive_in_denominator

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, positive_in_denominator={self.positive_in_denominator}"

    def forward(self, z_equi: Tensor, z_aug: Tensor) -> Tensor:
        """Loss for z_equi = z^ [B, E] (predicted from the clean view and t) and z_aug = z' [B, E]
        (the augmented view), row i of both from clip i. Returns a scalar (float32 or float64)."""
        return self.loss_and_accuracy(z_equi, z_aug)[0]

    def loss_and_accuracy(self, z_equi: Tensor, z_aug: Tensor) -> tuple[Tensor, Tensor]:
        """As :meth:`forward`, plus the detached top-1 accuracy: the fraction (in [0, 1]) of the
        2B local anchors whose most similar candidate (itself excluded) is their positive."""
        _check_pair("z_equi", z_equi, "z_aug", z_aug)
        local, width = z_equi.shape
        with _full_precision(z_equi.device):
            q = _normalise(z_equi)
            p = _normalise(z_aug)
            # One collective for both views: [B, 2E] -> [N, 2E].
            q_all, p_all = gather_with_grad(torch.cat([q, p], dim=1)).split(width, dim=1)
            total = q_all.shape[0]
            if not self.positive_in_denominator and total < 2:
                raise ValueError(
                    f"the EquiMod loss (positive_in_denominator=False) needs a global batch N >= 2 "
                    f"(it has no negative otherwise), got N={total}; use a larger batch"
                )
            # Rows: the B z^ anchors, then the B z' anchors. Columns: all N z^, then all N z'.
            anchors = torch.cat([q, p], dim=0)  # [2B, E]
            keys = torch.cat([q_all, p_all], dim=0)  # [2N, E]
            logits = anchors @ keys.T / self.temperature  # [2B, 2N]

            g = rank() * local + torch.arange(local, device=logits.device)
            self_col = torch.cat([g, total + g])  # z^_g sits in column g, z'_g in column N + g
            pos_col = torch.cat([total + g, g])
            rows = torch.arange(2 * local, device=logits.device)
            # An anchor is never its own candidate: -inf gives it zero probability and zero gradient.
            self_mask = torch.zeros_like(logits, dtype=torch.bool)
            self_mask[rows, self_col] = True
            logits = logits.masked_fill(self_mask, -math.inf)

            if self.positive_in_denominator:
                loss = F.cross_entropy(logits, pos_col)
            else:
                pos_mask = torch.zeros_like(self_mask)
                pos_mask[rows, pos_col] = True
                negatives = logits.masked_fill(pos_mask, -math.inf)  # 2N-2 finite entries per row
                loss = (torch.logsumexp(negatives, dim=1) - logits[rows, pos_col]).mean()
            accuracy = (logits.detach().argmax(dim=1) == pos_col).to(logits.dtype).mean()
        return loss, accuracy


class InterModalLoss(nn.Module):
    """Audio-visual contrastive loss (paper Eqs. 14-15), keys without gradient.

    For local i (global index g = rank*B + i), with unit vectors and sg() = stop-gradient:

        l_a(i) = -s(a_g, sg(v_g)) + log sum_{j=1..N} exp s(a_g, sg(v_j))
        l_v(i) = -s(v_g, sg(a_g)) + log sum_{j=1..N} exp s(v_g, sg(a_j))
        L_inter = (mean_i l_a(i) + mean_i l_v(i)) / 2

    The keys are gathered without gradient, and the **local slice is detached too**, also with
    one process. That makes the objective the same for every W: the gradient reaches each
    embedding only through its role as a query. Keeping the local slice live (as open_clip does)
    would make key j's gradient depend on which queries share its process, i.e. on W; the
    authors' release has keys with gradient on one GPU and none on several (docs/losses.md).

    Args:
        temperature: tau > 0 (0.07 in the paper; fixed, not learned).
    """

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        self.temperature = _check_temperature(temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    def forward(self, z_audio: Tensor, z_visual: Tensor) -> Tensor:
        """Loss for the inter-modal embeddings z_audio [B, E], z_visual [B, E] (row i of both from
        clip i). Returns a scalar (float32 or float64)."""
        return self.loss_and_accuracy(z_audio, z_visual)[0]

    def loss_and_accuracy(self, z_audio: Tensor, z_visual: Tensor) -> tuple[Tensor, Tensor]:
        """As :meth:`forward`, plus the detached top-1 retrieval accuracy over the N global keys,
        the mean of audio->visual and visual->audio (a fraction in [0, 1])."""
        _check_pair("z_audio", z_audio, "z_visual", z_visual)
        local, width = z_audio.shape
        with _full_precision(z_audio.device):
            a = _normalise(z_audio)
            v = _normalise(z_visual)
            a_all, v_all = gather_no_grad(torch.cat([a, v], dim=1)).split(width, dim=1)  # [N, E] each
            targets = rank() * local + torch.arange(local, device=a.device)
            logits_a = a @ v_all.T / self.temperature  # [B, N]
            logits_v = v @ a_all.T / self.temperature  # [B, N]
            loss = (F.cross_entropy(logits_a, targets) + F.cross_entropy(logits_v, targets)) / 2
            with torch.no_grad():
                hits_a = (logits_a.argmax(dim=1) == targets).to(a.dtype).mean()
                hits_v = (logits_v.argmax(dim=1) == targets).to(a.dtype).mean()
                accuracy = (hits_a + hits_v) / 2
        return loss, accuracy


class EquiAVLoss(nn.Module):
    """Total pre-training loss (paper Eq. 16):

        L = weight_inter * L_inter + weight_audio * L_intra,a + weight_visual * L_intra,v

    All weights are 1 in the paper; the release uses 1/3 each: the same objective up to a factor
    1/3, and nearly the same training (docs/losses.md says when the scale matters). A zero weight
    drops a term from the objective; the term is still computed and logged.

    Args:
        temperature: tau of both losses (0.07).
        weight_inter, weight_audio, weight_visual: finite, >= 0, not all zero.
        positive_in_denominator: see :class:`IntraModalLoss`.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        weight_inter: float = 1.0,
        weight_audio: float = 1.0,
        weight_visual: float = 1.0,
        positive_in_denominator: bool = True,
    ) -> None:
        super().__init__()
        self.weight_inter = _check_weight("weight_inter", weight_inter)
        self.weight_audio = _check_weight("weight_audio", weight_audio)
        self.weight_visual = _check_weight("weight_visual", weight_visual)
        if self.weight_inter + self.weight_audio + self.weight_visual == 0:
            raise ValueError(
                "weight_inter, weight_audio and weight_visual are all 0, so nothing would be trained; "
                "set at least one > 0 (the paper uses 1, 1, 1)"
            )
        self.intra = IntraModalLoss(temperature, positive_in_denominator)
        self.inter = InterModalLoss(temperature)

    def extra_repr(self) -> str:
        return f"weight_inter={self.weight_inter}, weight_audio={self.weight_audio}, weight_visual={self.weight_visual}"

    def forward(self, outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Losses and training accuracies from the model's outputs.

        Args:
            outputs: at least the keys of ``REQUIRED_OUTPUTS``, each [B, E] (others are ignored):
                audio_equi / visual_equi = z^, audio_aug / visual_aug = z', audio_inter /
                visual_inter = zbar (the centroid embeddings).

        Returns:
            Scalars: "loss" (the weighted total), "inter", "intra_audio", "intra_visual" (with
            gradient, so that two-stage or alternating schedules can back-propagate one term) and,
            detached, "acc_inter", "acc_intra_audio", "acc_intra_visual" (fractions in [0, 1] over
            the local anchors; average them over ranks for a global figure).
        """
        missing = [key for key in REQUIRED_OUTPUTS if key not in outputs]
        if missing:
            raise KeyError(f"EquiAVLoss needs the model outputs {missing}; got keys {sorted(outputs)}")
        # Every rank runs the three terms in the same order: each holds a collective.
        intra_audio, acc_audio = self.intra.loss_and_accuracy(outputs["audio_equi"], outputs["audio_aug"])
        intra_visual, acc_visual = self.intra.loss_and_accuracy(outputs["visual_equi"], outputs["visual_aug"])
        inter, acc_inter = self.inter.loss_and_accuracy(outputs["audio_inter"], outputs["visual_inter"])
        total = self.weight_inter * inter + self.weight_audio * intra_audio + self.weight_visual * intra_visual
        return {
            "loss": total,
            "inter": inter,
            "intra_audio": intra_audio,
            "intra_visual": intra_visual,
            "acc_inter": acc_inter,
            "acc_intra_audio": acc_audio,
            "acc_intra_visual": acc_visual,
        }

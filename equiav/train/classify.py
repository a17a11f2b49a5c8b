"""The classifier's objective and its evaluation over a whole evaluation set, in one place for
fine-tuning (equiav.train.finetune) and anyone scoring an EquiAVClassifier: inputs of a batch,
the task's targets and loss, the metric over every clip gathered from all processes, and the
chance level it is read against."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from equiav.augment import normalize_image
from equiav.metrics import mean_average_precision, top1_accuracy
from equiav.model import EquiAVClassifier
from equiav.train.common import autocast, gather_tensor

__all__ = [
    "EvalResult",
    "batch_inputs",
    "chance_level",
    "classification_loss",
    "classification_targets",
    "evaluate",
    "gather_whole_set",
]


def batch_inputs(
    batch: Mapping[str, Any], model: EquiAVClassifier, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """(audio [B, T, F] or None, ImageNet-normalised visual [B, 3, H, W] / [B, N, 3, H, W] or None)."""
    audio = batch["fbank"].to(device, non_blocking=True) if model.uses_audio else None
    visual = normalize_image(batch["frames"].to(device, non_blocking=True)) if model.uses_visual else None
    return audio, visual


def classification_targets(labels: Tensor, task: str) -> Tensor:
    """Loss targets from multi-hot labels: as they are for BCE, rows normalised to sum 1 for CE."""
    if task == "multiclass":
        return labels / labels.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return labels


def classification_loss(logits: Tensor, targets: Tensor, task: str) -> Tensor:
    if task == "multiclass":
        return F.cross_entropy(logits, targets)
    return F.binary_cross_entropy_with_logits(logits, targets)


@dataclass(frozen=True)
class EvalResult:
    """value: the metric over the whole evaluation set; loss: the training loss on it; clips: N."""

    value: float
    loss: float
    clips: int


def chance_level(targets: Tensor, metric: str) -> float:
    """What an uninformed predictor scores on multi-hot ``targets`` [N, C].

    accuracy: the majority-class rate (always predicting the most frequent class; 1/C on a
    balanced set). map: the mean prevalence of the classes with a positive (the expected AP of
    random scores).
    """
    prevalence = (targets > 0.5).double().mean(dim=0)
    if metric == "accuracy":
        return float(prevalence.max())
    present = prevalence[prevalence > 0]
    return float(present.mean()) if present.numel() else float("nan")


def gather_whole_set(scores: Tensor, targets: Tensor, indices: Tensor, expected: int) -> tuple[Tensor, Tensor]:
    """Every rank's outputs concatenated, the DistributedSampler's padding duplicates dropped,
    sorted by data-set index. Checks that each of the ``expected`` clips is there exactly once."""
    scores, targets, indices = gather_tensor(scores), gather_tensor(targets), gather_tensor(indices)
    order = torch.argsort(indices, stable=True)
    indices = indices[order]
    first = torch.ones_like(indices, dtype=torch.bool)
    first[1:] = indices[1:] != indices[:-1]
    keep = order[first]
    if int(first.sum()) != expected:
        raise RuntimeError(
            f"evaluation gathered {int(first.sum())} distinct clips, expected {expected}; every rank must "
            "evaluate its DistributedSampler shard"
        )
    return scores[keep], targets[keep]


@torch.inference_mode()
def evaluate(
    model: EquiAVClassifier,
    loader: DataLoader,
    *,
    task: str,
    metric: str,
    precision: str,
    device: torch.device,
) -> EvalResult:
    """The metric over the **whole** evaluation set, identical on every rank.

    Each rank runs its shard of ``loader``'s data set (a DistributedSampler, which pads the
    shards to equal length by repeating clips); scores, labels and data-set indices are
    gathered from all ranks and each clip is counted once.
    """
    model.eval()
    scores, targets, indices = [], [], []
    for batch in loader:
        audio, visual = batch_inputs(batch, model, device)
        with autocast(precision, device):
            logits = model(audio=audio, visual=visual)
        scores.append(logits.float())
        targets.append(batch["label"].to(device))
        indices.append(batch["index"].to(device))
    num_classes = model.head.out_features
    local_scores = torch.cat(scores) if scores else torch.zeros(0, num_classes, device=device)
    local_targets = torch.cat(targets) if targets else torch.zeros(0, num_classes, device=device)
    local_indices = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long, device=device)
    logits, labels = gather_whole_set(local_scores, local_targets, local_indices, len(loader.dataset))
    logits, labels = logits.cpu(), labels.cpu()
    loss = float(classification_loss(logits, classification_targets(labels, task), task))
    probabilities = torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=1)
    value = mean_average_precision(probabilities, labels) if metric == "map" else top1_accuracy(probabilities, labels)
    return EvalResult(value=value, loss=loss, clips=len(labels))

"""Class-balanced sampling that works the same in one process and under DDP.

The release wraps ``WeightedRandomSampler`` in a ``DistributedSamplerWrapper``, where each rank
draws on its own; here every rank makes the **same** global draw (seeded by seed + epoch, the
convention of ``torch.utils.data.DistributedSampler``) and takes every world_size-th element
from its rank on. The union over ranks is therefore exactly the draw one process would make.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Sampler

from equiav import distributed

__all__ = ["DistributedWeightedSampler", "class_balanced_weights"]

# torch.multinomial's limit on the number of categories.
_MAX_CATEGORIES = 2**24


def class_balanced_weights(labels: Sequence[Sequence[int]], num_classes: int) -> Tensor:
    """Per-clip sampling weights that balance the classes (method.md section 8).

    The weight of label c is ``1000 / (count_c + 0.01)``, count_c being the number of clips
    carrying c; a clip's weight is the sum over its labels (0 for a clip without labels, which is
    then never drawn).

    Args:
        labels: for each clip, the indices of its classes.
        num_classes: C.

    Returns:
        float64 [N] weights.
    """
    flat = torch.tensor([c for clip in labels for c in clip], dtype=torch.long)
    owner = torch.repeat_interleave(torch.tensor([len(clip) for clip in labels], dtype=torch.long))
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_classes):
        raise ValueError(f"label indices must lie in [0, {num_classes}), got [{int(flat.min())}, {int(flat.max())}]")
    counts = torch.bincount(flat, minlength=num_classes).to(torch.float64)
    label_weight = 1000.0 / (counts + 0.01)
    weights = torch.zeros(len(labels), dtype=torch.float64)
    return weights.index_add_(0, owner, label_weight[flat])


class DistributedWeightedSampler(Sampler[int]):
    """Draw ``num_samples`` indices per epoch with replacement, proportionally to ``weights``,
    split across ranks.

    Every rank draws the same ``ceil(num_samples / world_size) * world_size`` indices from a
    generator seeded with ``seed + epoch`` (call :meth:`set_epoch` before each epoch) and keeps
    positions ``rank, rank + world_size, ...``: each rank gets the same count, and the union over
    ranks is the single-process draw of that many samples.

    Args:
        weights: [N] non-negative sampling weights (e.g. :func:`class_balanced_weights`).
        num_samples: indices per epoch over all ranks (default N, one "epoch" of draws).
        num_replicas, rank: default to the process group's world size and rank (1 and 0 without one).
        seed: the base seed, identical on every rank.
    """

    def __init__(
        self,
        weights: Sequence[float] | Tensor,
        num_samples: int | None = None,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
    ) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        if self.weights.dim() != 1 or self.weights.numel() == 0:
            raise ValueError(f"weights must be a non-empty [N] vector, got shape {tuple(self.weights.shape)}")
        if self.weights.numel() > _MAX_CATEGORIES:
            raise ValueError(
                f"torch.multinomial draws from at most {_MAX_CATEGORIES} items, got {self.weights.numel()}"
            )
        if bool((self.weights < 0).any()) or not bool(torch.isfinite(self.weights).all()):
            raise ValueError("weights must be finite and >= 0")
        if not float(self.weights.sum()) > 0:
            raise ValueError("every weight is 0: no clip can be drawn (do the clips carry labels?)")
        self.num_replicas = distributed.world_size() if num_replicas is None else num_replicas
        self.rank = distributed.rank() if rank is None else rank
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is outside [0, num_replicas={self.num_replicas})")
        total = self.weights.numel() if num_samples is None else num_samples
        if total < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = -(-total // self.num_replicas)  # per rank
        self.total_size = self.num_samples * self.num_replicas
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the draw of ``epoch`` for the next iteration (the same on every rank)."""
        self.epoch = epoch

    def global_draw(self) -> Tensor:
        """int64 [total_size]: this epoch's draw over all ranks, in order."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator)

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_draw()[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples

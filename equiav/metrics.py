"""Evaluation metrics: mean average precision, top-1 accuracy and retrieval ranks.

Everything is vectorised torch (no scikit-learn at run time) and accepts tensors or numpy
arrays on any device. Conventions (see docs/evaluation.md):

* **Average precision** is scikit-learn's ``average_precision_score`` exactly, ties included:
  one operating point per distinct score, ``AP = sum_k (R_k - R_{k-1}) P_k``. The mean is taken
  over the classes with at least one positive; a class without positives has no AP (NaN in the
  per-class output) and is left out of the mean.
* **Top-1 accuracy** counts a clip as correct when its highest-scoring class is one of its
  labels (for single-label data: the label).
* **Retrieval ranks** are 1-based and **pessimistic**: the rank of the true key is the number of
  keys whose similarity is greater than *or equal to* its own (itself included). A key tied with
  the true match is ranked ahead of it, so a model that gives every key the same score gets rank
  N, not 1. Recalls are fractions in [0, 1].
"""

from __future__ import annotations

from typing import Literal, overload

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "RECALL_KS",
    "chunked_similarity_ranks",
    "mean_average_precision",
    "rank_metrics",
    "retrieval_metrics",
    "similarity_ranks",
    "top1_accuracy",
]

RECALL_KS: tuple[int, ...] = (1, 5, 10)

ArrayLike = Tensor | np.ndarray


def _as_tensor(x: ArrayLike, name: str) -> Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, Tensor):
        return x
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")


# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


def _check_scores_targets(scores: Tensor, targets: Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be [N, C], got shape {tuple(scores.shape)}")
    if targets.shape != scores.shape:
        raise ValueError(
            f"targets must be multi-hot with the shape of scores {tuple(scores.shape)}, got {tuple(targets.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError("cannot compute a metric over 0 clips; is the evaluation split empty?")


@overload
def mean_average_precision(scores: ArrayLike, targets: ArrayLike, *, per_class: Literal[False] = ...) -> float: ...
@overload
def mean_average_precision(
    scores: ArrayLike, targets: ArrayLike, *, per_class: Literal[True]
) -> tuple[float, np.ndarray]: ...
def mean_average_precision(
    scores: ArrayLike, targets: ArrayLike, *, per_class: bool = False
) -> float | tuple[float, np.ndarray]:
    """Mean over classes of scikit-learn's average precision.

    Args:
        scores: [N, C] any real scores (logits or probabilities: AP depends only on the order
            within each class).
        targets: [N, C] multi-hot; a value > 0.5 is a positive (soft mixup labels never reach
            evaluation, but a 0.9/0.1 smoothed target still counts as what it is closest to).
        per_class: also return the AP of every class.

    Returns:
        mAP over the classes with at least one positive (NaN when no class has one), and with
        ``per_class`` a float64 numpy array [C] of APs, NaN for classes without positives.
    """
    s = _as_tensor(scores, "scores").detach().to(torch.float64)
    t = _as_tensor(targets, "targets").detach().to(s.device) > 0.5
    _check_scores_targets(s, t)
    n = s.shape[0]
    # Stable descending sort per class, the order scikit-learn's _binary_clf_curve uses.
    sorted_scores, order = torch.sort(s, dim=0, descending=True, stable=True)
    hits = t.gather(0, order).to(torch.float64)  # [N, C] positives in score order
    true_positives = hits.cumsum(dim=0)
    ranks = torch.arange(1, n + 1, device=s.device, dtype=torch.float64)[:, None]
    precision = true_positives / ranks  # precision after the first i+1 clips
    # All clips tied at one score form one operating point: each positive of the group is
    # credited with the precision at the group's last row. The group end of row i is the first
    # row j >= i that is last of its group, found as a reverse running minimum.
    last_of_group = torch.ones_like(hits, dtype=torch.bool)
    last_of_group[:-1] = sorted_scores[:-1] != sorted_scores[1:]
    row = torch.arange(n, device=s.device)[:, None].expand_as(hits)
    end_index = torch.where(last_of_group, row, torch.full_like(row, n))
    end_index = end_index.flip(0).cummin(dim=0).values.flip(0)
    group_precision = precision.gather(0, end_index)
    positives = hits.sum(dim=0)
    ap = (hits * group_precision).sum(dim=0) / positives  # NaN where a class has no positive
    ap_numpy = ap.cpu().numpy()
    valid = positives > 0
    mean = float(ap[valid].mean()) if bool(valid.any()) else float("nan")
    return (mean, ap_numpy) if per_class else mean


def top1_accuracy(scores: ArrayLike, targets: ArrayLike) -> float:
    """Fraction of clips whose highest-scoring class is one of their labels.

    Args:
        scores: [N, C].
        targets: class indices [N] (int) or multi-hot [N, C] (a value > 0.5 is a label).
            For single-label data both give the usual accuracy; with several labels a clip is
            correct when the prediction is any of them.
    """
    s = _as_tensor(scores, "scores").detach()
    t = _as_tensor(targets, "targets").detach().to(s.device)
    if s.dim() != 2 or s.shape[0] == 0:
        raise ValueError(f"scores must be [N, C] with N > 0, got shape {tuple(s.shape)}")
    predicted = s.argmax(dim=1)
    if t.dim() == 1:
        if t.shape[0] != s.shape[0] or t.is_floating_point():
            raise ValueError(f"class-index targets must be integer [N={s.shape[0]}], got {t.dtype} {tuple(t.shape)}")
        correct = predicted == t
    else:
        _check_scores_targets(s, t)
        correct = t.gather(1, predicted[:, None]).squeeze(1) > 0.5
    return float(correct.double().mean())


# --------------------------------------------------------------------------------------------
# Retrieval
# --------------------------------------------------------------------------------------------


def _default_targets(num_queries: int, num_keys: int, targets: Tensor | None, device: torch.device) -> Tensor:
    if targets is None:
        if num_queries > num_keys:
            raise ValueError(
                f"{num_queries} queries but {num_keys} keys: the default positives (query i matches key i) "
                "need at least as many keys as queries; pass targets="
            )
        return torch.arange(num_queries, device=device)
    targets = targets.to(device=device, dtype=torch.long)
    if targets.shape != (num_queries,):
        raise ValueError(f"targets must be [Nq={num_queries}] key indices, got shape {tuple(targets.shape)}")
    if num_queries and (int(targets.min()) < 0 or int(targets.max()) >= num_keys):
        raise ValueError(
            f"targets must index the {num_keys} keys, got values in [{int(targets.min())}, {int(targets.max())}]"
        )
    return targets


def similarity_ranks(similarity: ArrayLike, targets: ArrayLike | None = None) -> Tensor:
    """1-based pessimistic rank of each query's true key.

    Args:
        similarity: [Nq, Nk], larger = more similar.
        targets: [Nq] index of the true key of each query; default the diagonal (query i <-> key i).

    Returns:
        int64 [Nq]: the number of keys scoring >= the true key (ties ranked worst).
    """
    sim = _as_tensor(similarity, "similarity").detach()
    if sim.dim() != 2:
        raise ValueError(f"similarity must be [Nq, Nk], got shape {tuple(sim.shape)}")
    t = _default_targets(
        sim.shape[0], sim.shape[1], None if targets is None else _as_tensor(targets, "targets"), sim.device
    )
    true_score = sim.gather(1, t[:, None])
    return (sim >= true_score).sum(dim=1)


def chunked_similarity_ranks(
    queries: Tensor, keys: Tensor, *, chunk: int = 4096, targets: Tensor | None = None
) -> Tensor:
    """:func:`similarity_ranks` of ``queries @ keys.T`` without holding the full matrix.

    One matrix product per chunk of ``chunk`` queries ([chunk, Nk] in memory at a time), so a
    20k x 20k evaluation fits on any device. Pass L2-normalised embeddings for cosine similarity.

    Args:
        queries: [Nq, E]. keys: [Nk, E] (same device and dtype).
        chunk: queries per matrix product.
        targets: [Nq] true key per query; default the diagonal.

    Returns:
        int64 [Nq] ranks, equal to ``similarity_ranks(queries @ keys.T, targets)``.
    """
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"queries [Nq, E] and keys [Nk, E] must share E, got {tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    t = _default_targets(queries.shape[0], keys.shape[0], targets, queries.device)
    keys_t = keys.T
    ranks = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start : start + chunk] @ keys_t  # [c, Nk]
        true_score = sim.gather(1, t[start : start + chunk, None])
        ranks.append((sim >= true_score).sum(dim=1))
    if not ranks:
        return torch.zeros(0, dtype=torch.long, device=queries.device)
    return torch.cat(ranks)


def rank_metrics(ranks: ArrayLike, ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
    """Recall@k, median and mean rank from 1-based ranks [N].

    Returns ``{"R@1": ..., "R@5": ..., "R@10": ..., "median_rank": ..., "mean_rank": ...}``;
    recalls are fractions in [0, 1]; the median of an even count is the mean of the middle two.
    """
    r = _as_tensor(ranks, "ranks").detach().to(torch.float64)
    if r.dim() != 1 or r.numel() == 0:
        raise ValueError(f"ranks must be a non-empty [N] vector, got shape {tuple(r.shape)}")
    out = {f"R@{k}": float((r <= k).double().mean()) for k in ks}
    # torch.median returns the lower middle value; the usual median averages the two.
    out["median_rank"] = float(np.median(r.cpu().numpy()))
    out["mean_rank"] = float(r.mean())
    return out


def retrieval_metrics(similarity: ArrayLike, targets: ArrayLike | None = None) -> dict[str, float]:
    """Recall@1/5/10, median and mean rank of a similarity matrix [Nq, Nk] (queries x keys),
    with the true key of each query on the diagonal unless ``targets`` [Nq] says otherwise.
    Ties are ranked pessimistically (see the module docstring)."""
    return rank_metrics(similarity_ranks(similarity, targets))

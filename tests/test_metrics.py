"""Evaluation metrics against scikit-learn and naive Python loops (equiav/metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from equiav.metrics import (
    chunked_similarity_ranks,
    mean_average_precision,
    rank_metrics,
    retrieval_metrics,
    similarity_ranks,
    top1_accuracy,
)


def _sklearn_map(scores: np.ndarray, targets: np.ndarray) -> tuple[float, list[float]]:
    per_class = [
        average_precision_score(targets[:, c], scores[:, c]) if targets[:, c].any() else np.nan
        for c in range(targets.shape[1])
    ]
    return float(np.nanmean(per_class)), per_class


@pytest.mark.parametrize("seed", range(8))
def test_map_equals_sklearn_with_ties_and_empty_classes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(5, 80)), 7
    # Few distinct values: many ties within a class, including ties between positives and negatives.
    scores = rng.integers(0, 4, size=(n, c)).astype(np.float64) / 3
    targets = (rng.random((n, c)) < 0.3).astype(np.float64)
    targets[:, 2] = 0  # a class without positives
    targets[:, 5] = 1  # a class where every clip is positive
    expected, expected_per_class = _sklearn_map(scores, targets)
    value, per_class = mean_average_precision(torch.from_numpy(scores), torch.from_numpy(targets), per_class=True)
    assert value == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(per_class, expected_per_class, atol=1e-12)
    assert np.isnan(per_class[2])


def test_map_with_continuous_scores_and_numpy_inputs() -> None:
    rng = np.random.default_rng(11)
    scores = rng.normal(size=(200, 12)).astype(np.float32)
    targets = (rng.random((200, 12)) < 0.1).astype(np.int64)
    expected, _ = _sklearn_map(scores.astype(np.float64), targets)
    assert mean_average_precision(scores, targets) == pytest.approx(expected, abs=1e-9)


def test_map_perfect_and_worst_rankings() -> None:
    targets = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0]], dtype=torch.float32)
    assert mean_average_precision(targets * 2 - 1, targets) == pytest.approx(1.0)
    # Every clip tied: one operating point, AP = prevalence.
    assert mean_average_precision(torch.zeros(4, 2), targets) == pytest.approx((0.5 + 0.25) / 2)


def test_map_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="shape of scores"):
        mean_average_precision(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="0 clips"):
        mean_average_precision(torch.zeros(0, 2), torch.zeros(0, 2))


def test_top1_accuracy_with_indices_and_multi_hot() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    indices = torch.tensor([0, 1, 0, 1])
    assert top1_accuracy(scores, indices) == pytest.approx(0.5)
    multi_hot = torch.nn.functional.one_hot(indices, 3).float()
    assert top1_accuracy(scores, multi_hot) == pytest.approx(0.5)
    multi_hot[2, 2] = 1.0  # a second label that the prediction hits
    assert top1_accuracy(scores, multi_hot) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="integer"):
        top1_accuracy(scores, indices.float())


def _naive_ranks(similarity: np.ndarray, targets: np.ndarray) -> list[int]:
    ranks = []
    for q in range(similarity.shape[0]):
        true = similarity[q, targets[q]]
        ranks.append(sum(1 for k in range(similarity.shape[1]) if similarity[q, k] >= true))
    return ranks


@pytest.mark.parametrize("seed", range(5))
def test_retrieval_metrics_equal_a_naive_loop_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 37
    similarity = rng.integers(0, 6, size=(n, n)).astype(np.float64)  # ties everywhere
    ranks = _naive_ranks(similarity, np.arange(n))
    metrics = retrieval_metrics(torch.from_numpy(similarity))
    for k in (1, 5, 10):
        assert metrics[f"R@{k}"] == pytest.approx(np.mean([r <= k for r in ranks]))
    assert metrics["median_rank"] == pytest.approx(float(np.median(ranks)))
    assert metrics["mean_rank"] == pytest.approx(float(np.mean(ranks)))


def test_ties_are_ranked_pessimistically() -> None:
    # Every key equally similar: the true key ranks last, not first.
    ranks = similarity_ranks(torch.ones(4, 4))
    assert ranks.tolist() == [4, 4, 4, 4]
    similarity = torch.tensor([[0.9, 0.9, 0.1], [0.2, 0.8, 0.1], [0.3, 0.4, 0.5]])
    assert similarity_ranks(similarity).tolist() == [2, 1, 1]


def test_explicit_targets_and_rectangular_similarity() -> None:
    rng = np.random.default_rng(3)
    similarity = rng.integers(0, 4, size=(6, 15)).astype(np.float64)
    targets = rng.integers(0, 15, size=6)
    expected = _naive_ranks(similarity, targets)
    assert similarity_ranks(torch.from_numpy(similarity), torch.from_numpy(targets)).tolist() == expected
    with pytest.raises(ValueError, match="at least as many keys"):
        similarity_ranks(torch.zeros(5, 3))


def test_even_median_is_the_mean_of_the_middle_two() -> None:
    assert rank_metrics(torch.tensor([1, 2, 5, 9]))["median_rank"] == 3.5


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_chunked_ranks_equal_the_full_matrix(chunk: int) -> None:
    generator = torch.Generator().manual_seed(0)
    # Small integers: every product is exact, so ties are real ties in both computations.
    queries = torch.randint(-2, 3, (50, 8), generator=generator).float()
    keys = torch.randint(-2, 3, (50, 8), generator=generator).float()
    full = similarity_ranks(queries @ keys.T)
    assert torch.equal(chunked_similarity_ranks(queries, keys, chunk=chunk), full)
    targets = torch.randint(0, 50, (50,), generator=generator)
    assert torch.equal(
        chunked_similarity_ranks(queries, keys, chunk=chunk, targets=targets),
        similarity_ranks(queries @ keys.T, targets),
    )

"""Evaluation: metrics (mAP, top-1 accuracy, retrieval ranks) and zero-shot retrieval.

Fine-tuning lives in :mod:`equiav.train.finetune`; see docs/evaluation.md for both stages.
"""

from equiav.eval.metrics import (
    chunked_similarity_ranks,
    mean_average_precision,
    rank_metrics,
    retrieval_metrics,
    similarity_ranks,
    top1_accuracy,
)

__all__ = [
    "chunked_similarity_ranks",
    "mean_average_precision",
    "rank_metrics",
    "retrieval_metrics",
    "similarity_ranks",
    "top1_accuracy",
]

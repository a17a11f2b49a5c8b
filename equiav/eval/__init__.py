"""Evaluation: zero-shot retrieval (``retrieval``), the paper's tables (``tables``,
``paper_numbers``), the run summary and the report's figures. Fine-tuning is a training stage
(:mod:`equiav.train.finetune`); the metrics both use are :mod:`equiav.metrics`. See
docs/evaluation.md. Kept light: the workflow imports ``tables`` at parse time, without torch.
"""

"""Training: pre-training (``pretrain``), its data pipeline (``data``), fine-tuning
(``finetune``, with its batch transforms ``finetune_augment`` and its objective and whole-set
evaluation ``classify``), the class-balanced sampler (``sampling``), and the plumbing both share
(``common``: processes, precision, optimiser, schedule, signals; ``metric_log``: the metric CSV;
``checkpoint``: rolling checkpoints, exported weights and the resume check). Their settings are
:mod:`equiav.settings`. See docs/training.md and docs/evaluation.md."""

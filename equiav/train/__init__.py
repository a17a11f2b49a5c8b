"""Training: pre-training (``pretrain``), its data pipeline (``data``), and the plumbing shared
with fine-tuning (``common``: processes, precision, optimiser, schedule, logs, signals;
``checkpoint``: rolling checkpoints and exported weights). See docs/training.md."""

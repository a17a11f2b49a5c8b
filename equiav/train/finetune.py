"""Fine-tuning and evaluation of a pre-trained EquiAV (method.md section 8, pipeline stage 6).

``equiav finetune`` trains an :class:`~equiav.model.EquiAVClassifier` (audio, visual or
audio-visual) from the pre-trained weights, evaluates it on the whole evaluation set after
every epoch and writes ``metrics.json``. With ``folds`` it runs k-fold cross-validation (ESC-50).
One process or many (``torchrun``: DDP, metrics gathered from every rank); a killed run resumes
from its newest checkpoint in ``--work-dir``. Recipes, metrics and deviations from the release
are documented in docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from equiav.atomic import write_json
from equiav.data.inputs import DatasetInputs, fit_config_to_data
from equiav.data.store import FeatureDataset
from equiav.model import EquiAVClassifier, ModelConfig
from equiav.options import add_dataset_inputs, add_pretrained, add_settings
from equiav.settings.finetune import RESUMABLE_CHANGES, FinetuneSettings
from equiav.train.checkpoint import Checkpointer, check_same_run, code_revision, load_export, starting_point
from equiav.train.classify import (
    EvalResult,
    batch_inputs,
    chance_level,
    classification_loss,
    classification_targets,
    evaluate,
)
from equiav.train.common import (
    DistInfo,
    StopSignal,
    WarmupCosine,
    any_rank,
    autocast,
    build_optimizer,
    cleanup_distributed,
    derive_seed,
    loader_worker_init,
    make_grad_scaler,
    resolve_precision,
    seed_everything,
    setup_distributed,
    unwrap_model,
)
from equiav.train.finetune_augment import TrainAugment
from equiav.train.metric_log import MetricLogger
from equiav.train.sampling import DistributedWeightedSampler, class_balanced_weights

__all__ = ["EXIT_INTERRUPTED", "add_arguments", "build_finetune_optimizer", "finetune", "run", "weights_digest"]

log = logging.getLogger(__name__)

# Exit status of a run stopped by SIGTERM/SIGUSR1 after saving its checkpoint (128 + SIGTERM).
EXIT_INTERRUPTED = 143


def build_finetune_optimizer(model: torch.nn.Module, settings: FinetuneSettings) -> torch.optim.AdamW:
    """AdamW with the classifier head (``head.*``) at ``head_lr_multiplier`` times the body's lr."""
    return build_optimizer(
        model,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        betas=settings.betas,
        head_lr_multiplier=settings.head_lr_multiplier,
        head_prefixes=("head.",),
    )


# --------------------------------------------------------------------------------------------
# One training run (one fold)
# --------------------------------------------------------------------------------------------


def _label_lists(dataset: FeatureDataset) -> list[list[int]]:
    position = {name: k for k, name in enumerate(dataset.classes)}
    return [[position[name] for name in str(labels).split(";") if name] for labels in dataset.index["labels"]]


def _multi_hot(labels: Sequence[Sequence[int]], num_classes: int) -> Tensor:
    """float32 [N, C] from per-clip class indices."""
    out = torch.zeros(len(labels), num_classes)
    for row, clip in enumerate(labels):
        out[row, list(clip)] = 1.0
    return out


def weights_digest(pretrained: Mapping[str, Any]) -> str:
    """SHA-256 of a pre-trained model's config and tensors, in key order.

    The weights, not the file: a re-export of the same weights (another code revision or
    settings note in the file) is the same model, so a fine-tuning run on it still resumes.
    """
    digest = hashlib.sha256(json.dumps(pretrained["model_config"], sort_keys=True).encode())
    for key, tensor in sorted(pretrained["model"].items()):
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class _Run:
    """One training run: what it trains on, where it keeps its state, and its identity (what a
    resumed run must share with the interrupted one)."""

    name: str
    train_splits: tuple[str, ...]
    eval_splits: tuple[str, ...]
    directory: Path
    identity: dict[str, Any]


def _check_identity(saved: Mapping[str, Any], run: _Run, where: Path) -> None:
    check_same_run(saved, run.identity, where=where, start_afresh=f"delete {run.directory} to start this run afresh")


class _Trainer:
    """Trains and evaluates one run; resumable from its checkpoints."""

    def __init__(
        self,
        settings: FinetuneSettings,
        run: _Run,
        inputs: DatasetInputs,
        pretrained: Mapping[str, Any],
        info: DistInfo,
        max_steps: int | None,
    ) -> None:
        self.settings, self.run, self.info = settings, run, info
        self.device = info.device
        self.precision = resolve_precision(settings.precision, self.device)
        s = settings
        uses_audio = s.modality in ("audio", "audiovisual")
        uses_visual = s.modality in ("visual", "audiovisual")

        self.train_set = inputs.dataset(run.train_splits, frame="random")
        self.eval_set = inputs.dataset(
            run.eval_splits, frame="all" if uses_visual and s.eval_frames == "all" else "middle"
        )
        self.labels = _label_lists(self.train_set)
        self.chance = chance_level(_multi_hot(_label_lists(self.eval_set), len(inputs.classes)), s.metric)
        if s.task == "multiclass":
            unlabelled = sum(1 for clip in self.labels if not clip)
            if unlabelled:
                raise ValueError(
                    f"{unlabelled} training clip(s) of {list(run.train_splits)} have no label; "
                    "task 'multiclass' needs one per clip (use 'multilabel' for data with unlabelled clips)"
                )
        config = ModelConfig.from_dict(pretrained["model_config"])
        config = fit_config_to_data(config, self.train_set.shard_attrs, audio=uses_audio, visual=uses_visual)

        if s.batch_size % info.world_size:
            raise ValueError(
                f"batch_size={s.batch_size} is the global batch and must be divisible by the "
                f"{info.world_size} processes"
            )
        self.local_batch = s.batch_size // info.world_size
        if s.balanced_sampling:
            weights = class_balanced_weights(self.labels, len(inputs.classes))
            self.train_sampler: DistributedWeightedSampler | DistributedSampler = DistributedWeightedSampler(
                weights, s.samples_per_epoch, num_replicas=info.world_size, rank=info.rank, seed=s.seed
            )
        else:
            self.train_sampler = DistributedSampler(
                self.train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=s.seed, drop_last=True
            )
        self.steps_per_epoch = len(self.train_sampler) // self.local_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set of {len(self.train_set)} clips gives {len(self.train_sampler)} per process, fewer "
                f"than one batch of {self.local_batch}; lower batch_size"
            )
        full_steps = s.epochs * self.steps_per_epoch
        self.total_steps = full_steps if max_steps is None else min(full_steps, max_steps)
        warmup = round(s.warmup_epochs * self.steps_per_epoch)

        torch.manual_seed(s.seed)  # the head's initialisation, the same on every rank
        model = EquiAVClassifier.from_pretrained(
            pretrained["model"], len(inputs.classes), s.modality, config=config, drop_path=s.drop_path
        ).to(self.device)
        self.model = model
        self.ddp: torch.nn.Module = (
            DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if info.world_size > 1
            else model
        )
        self.optimizer = build_finetune_optimizer(model, s)
        self.scheduler = WarmupCosine(
            self.optimizer,
            peak_lr=s.lr,
            total_steps=self.total_steps,
            warmup_steps=min(warmup, self.total_steps),
            start_lr=s.start_lr,
            min_lr=s.min_lr,
        )
        self.scaler = make_grad_scaler(self.precision, self.device)
        self.augment = TrainAugment.from_settings(s)
        self.checkpointer = Checkpointer(run.directory / "checkpoints")
        self.eval_loader = DataLoader(
            self.eval_set,
            batch_size=self.local_batch,
            sampler=DistributedSampler(self.eval_set, num_replicas=info.world_size, rank=info.rank, shuffle=False),
            num_workers=s.num_workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=loader_worker_init,
        )
        self.history: list[dict[str, float]] = []
        self.step = 0

    # ---- state -------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "history": self.history,
            "identity": self.run.identity,
            "revision": code_revision(),
        }

    def _resume(self) -> None:
        path = self.checkpointer.latest()
        if path is None:
            return
        state = self.checkpointer.load(path)
        _check_identity(state["identity"], self.run, path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.history = int(state["step"]), list(state["history"])
        log.info("%s: resumed from %s at step %d of %d", self.run.name, path, self.step, self.total_steps)

    # ---- loop --------------------------------------------------------------------------

    def _epoch_loader(self, epoch: int, skip_batches: int) -> DataLoader:
        """The loader of ``epoch``, starting after ``skip_batches`` batches (a resumed epoch)."""
        s = self.settings
        self.train_sampler.set_epoch(epoch)
        # Global RNGs (drop path, the random frame in the main process) per epoch and rank;
        # the loader's generator seeds the workers.
        seed_everything(derive_seed(s.seed, epoch), self.info.rank)
        indices = list(self.train_sampler)[skip_batches * self.local_batch :]
        return DataLoader(
            self.train_set,
            batch_size=self.local_batch,
            sampler=indices,
            drop_last=True,
            num_workers=s.num_workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=loader_worker_init,
            generator=torch.Generator().manual_seed(derive_seed(s.seed, epoch, self.info.rank)),
        )

    def _train_step(self, batch: Mapping[str, Any]) -> float:
        s = self.settings
        audio, visual = batch_inputs(batch, self.model, self.device)
        labels = batch["label"].to(self.device, non_blocking=True)
        # Per-step generator: the same augmentation draws after a resume, distinct per rank.
        rng = np.random.default_rng((s.seed, self.info.rank, self.step))
        audio, visual, labels = self.augment(audio, visual, labels, rng)
        self.scheduler.step()
        with autocast(self.precision, self.device):
            logits = self.ddp(audio=audio, visual=visual)
        loss = classification_loss(logits.float(), classification_targets(labels, s.task), s.task)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def _group_lr(self, head: bool) -> float:
        name = "head" if head else "body"
        return next(g["lr"] for g in self.optimizer.param_groups if g["name"].startswith(name))

    def train(self) -> bool:
        """Run to the end (True) or until a stop signal (False, after a checkpoint)."""
        self._resume()
        s, info = self.settings, self.info
        directory = self.run.directory
        log.info(
            "%s: fine-tuning %s (%s) on %d clips, evaluating on %d: %d steps (%d per epoch) on %d process(es), %s, %s",
            self.run.name, s.modality, s.metric, len(self.train_set), len(self.eval_set), self.total_steps,
            self.steps_per_epoch, info.world_size, self.device, self.precision,
        )  # fmt: skip
        # A gloo group keeps the per-step stop check off the GPU stream under NCCL.
        stop_group = dist.new_group(backend="gloo") if info.world_size > 1 and dist.get_backend() == "nccl" else None
        train_log = MetricLogger(
            directory / "train.csv", total_steps=self.total_steps, resume_step=self.step, enabled=info.is_main
        )
        eval_log = MetricLogger(directory / "eval.csv", resume_step=self.step, enabled=info.is_main)
        try:
            with StopSignal() as stop:
                loader_iter = None
                while self.step < self.total_steps:
                    epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
                    if loader_iter is None or in_epoch == 0:
                        loader_iter = iter(self._epoch_loader(epoch, in_epoch))
                        self.ddp.train()
                    loss = self._train_step(next(loader_iter))
                    train_log.log(
                        self.step, {"loss": loss, "lr": self._group_lr(False), "head_lr": self._group_lr(True)}
                    )
                    self.step += 1
                    end_of_epoch = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
                    if end_of_epoch:
                        loader_iter = None
                        result = self._evaluate()
                        row = {"epoch": epoch + 1, "step": self.step, "value": result.value, "eval_loss": result.loss}
                        self.history.append(row)
                        eval_log.log(self.step - 1, {k: float(v) for k, v in row.items() if k != "step"})
                        log.info(
                            "%s epoch %d: %s %.4f (chance %.4f), eval loss %.4f",
                            self.run.name, epoch + 1, s.metric, result.value, self.chance, result.loss,
                        )  # fmt: skip
                    stopping = bool(any_rank(int(stop.requested), stop_group))
                    if end_of_epoch or stopping:
                        self.checkpointer.save(self._state(), self.step)
                    if stopping:
                        log.warning("%s: stopped at step %d; run again to resume", self.run.name, self.step)
                        return False
        finally:
            train_log.close()
            eval_log.close()
            if stop_group is not None:
                dist.destroy_process_group(stop_group)
        return True

    def _evaluate(self) -> EvalResult:
        return evaluate(
            self.model, self.eval_loader, task=self.settings.task, metric=self.settings.metric,
            precision=self.precision, device=self.device,
        )  # fmt: skip

    def result(self) -> dict[str, Any]:
        """The finished run's summary: the metric after the last epoch (not the best one, which
        would select on the evaluation set), the chance level and the per-epoch history."""
        return {
            "value": self.history[-1]["value"],
            "chance": self.chance,
            "train_clips": len(self.train_set),
            "eval_clips": len(self.eval_set),
            "steps": self.total_steps,
            "history": self.history,
        }


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _runs(settings: FinetuneSettings, work_dir: Path, identity: Mapping[str, Any]) -> list[_Run]:
    if not settings.folds:
        return [_Run("run", settings.train_splits, settings.eval_splits, work_dir, dict(identity))]
    runs = []
    for fold in settings.folds:
        train = tuple(f for f in settings.folds if f != fold)
        runs.append(_Run(fold, train, (fold,), work_dir / fold, {**identity, "train": list(train), "eval": [fold]}))
    return runs


def _run_one(
    settings: FinetuneSettings,
    run: _Run,
    inputs: DatasetInputs,
    pretrained: Mapping[str, Any],
    info: DistInfo,
    max_steps: int | None,
) -> dict[str, Any] | None:
    """The summary of one run: read back when it finished before, else trained (None when
    a stop signal interrupted it)."""
    done = run.directory / "result.json"
    if done.exists():
        saved = json.loads(done.read_text())
        _check_identity(saved["identity"], run, done)
        log.info("%s: already finished (%s)", run.name, done)
        return saved["result"]
    trainer = _Trainer(settings, run, inputs, pretrained, info, max_steps)
    if not trainer.train():
        return None
    result = trainer.result()
    if info.is_main:
        write_json(done, {"identity": run.identity, "result": result})
        # The summary replaces the checkpoints: a finished fold of ViT-B keeps gigabytes otherwise.
        shutil.rmtree(trainer.checkpointer.directory, ignore_errors=True)
    return result


def finetune(
    settings: FinetuneSettings,
    pretrained_path: str | os.PathLike[str],
    inputs: DatasetInputs,
    work_dir: str | os.PathLike[str],
    *,
    info: DistInfo,
    max_steps: int | None = None,
) -> dict[str, Any] | None:
    """Fine-tune (every fold with ``folds``) and return the metrics.json content, or None when
    a stop signal interrupted the run (its checkpoint is saved; run again to resume)."""
    path = Path(pretrained_path)
    pretrained = load_export(path)
    identity = {
        **{k: v for k, v in settings.to_dict().items() if k not in RESUMABLE_CHANGES},
        "pretrained_sha256": weights_digest(pretrained),
        "max_steps": max_steps,
    }
    results: dict[str, dict[str, Any]] = {}
    for run in _runs(settings, Path(work_dir), identity):
        result = _run_one(settings, run, inputs, pretrained, info, max_steps)
        if result is None:
            return None
        results[run.name] = result
    metrics: dict[str, Any] = {
        "task": "finetune",
        "modality": settings.modality,
        "metric": settings.metric,
        "epochs": settings.epochs,
        "settings": settings.to_dict(),
        "pretrained": str(path),
        "start": starting_point(pretrained, path),
    }
    if settings.folds:
        metrics.update(
            value=float(np.mean([r["value"] for r in results.values()])),
            chance=float(np.mean([r["chance"] for r in results.values()])),
            # Every clip is evaluated once, in its own fold; each trains on the others.
            train_clips=sum(r["eval_clips"] for r in results.values()),
            eval_clips=sum(r["eval_clips"] for r in results.values()),
            folds=results,
        )
    else:
        single = results["run"]
        metrics.update({k: single[k] for k in ("value", "chance", "train_clips", "eval_clips", "steps", "history")})
    return metrics


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``equiav finetune``."""
    add_settings(p, 'FinetuneSettings, e.g. \'{"recipe": "esc50"}\'')
    add_pretrained(p)
    add_dataset_inputs(p)
    p.add_argument("--out", required=True, type=Path, help="where metrics.json goes")
    p.add_argument("--work-dir", required=True, type=Path, help="checkpoints and logs; a re-run resumes from here")
    p.add_argument("--max-steps", type=int, help="stop each run after this many steps (smoke tests; default: all)")


def run(args: argparse.Namespace) -> int:
    """The body of ``equiav finetune`` (logging is set up by equiav.cli)."""
    if args.max_steps is not None and args.max_steps < 1:
        raise SystemExit(f"--max-steps must be >= 1, got {args.max_steps}")
    settings = FinetuneSettings.from_dict(args.settings)
    inputs = DatasetInputs.load(args.usable, args.classes, args.norm_stats)
    info = setup_distributed()
    try:
        metrics = finetune(settings, args.pretrained, inputs, args.work_dir, info=info, max_steps=args.max_steps)
        if metrics is None:
            return EXIT_INTERRUPTED
        if info.is_main:
            write_json(Path(args.out), metrics)
            log.info("%s = %.4f (chance %.4f) -> %s", settings.metric, metrics["value"], metrics["chance"], args.out)
        return 0
    finally:
        cleanup_distributed()

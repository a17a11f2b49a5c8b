"""EquiAV pre-training on HDF5 feature shards (``equiav pretrain``; docs/training.md).

    equiav pretrain --settings settings.json --usable usable.csv \\
        --norm-stats norm_stats.json --out model.pt --work-dir work/     # one process
    equiav launch --gpus 8 -- pretrain ...                               # DDP: torchrun, one node or many

Rolling checkpoints, metrics.csv, TensorBoard events and the resolved configuration live in
``--work-dir``, outside the workflow's declared outputs (Snakemake deletes the outputs of a
failed job). A restarted job resumes from the newest checkpoint there and continues with exactly
the steps the uninterrupted run would have made. ``--out`` (the final weights) is written only
when training completes.

Exit codes: 0 when training completed and ``--out`` is written; 128 + signal number (143 for
SIGTERM, 138 for SIGUSR1) when a stop signal arrived: the checkpoint of the last finished step
is saved, ``--out`` is not written, and the non-zero code tells Snakemake / SLURM that the job
is not done (rerun or requeue it and it resumes); 1 on an error.

Kept whole: the Pretrainer's set-up, resume, loop and export share one state (the position in
the run, the model, optimiser and RNG streams), and the exactness of a resume depends on all of
them at once. What can stand apart does: the settings (:mod:`equiav.settings.pretrain`), the
data pipeline (:mod:`equiav.train.data`), the loss (:mod:`equiav.losses`) and the plumbing
shared with fine-tuning (:mod:`equiav.train.common`, ``checkpoint``, ``metric_log``).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from equiav.atomic import write_json
from equiav.data.inputs import read_norm_stats, read_usable
from equiav.data.store import FeatureDataset, read_index
from equiav.losses import EquiAVLoss
from equiav.model import EquiAV, ModelConfig, load_mae_weights
from equiav.options import add_dataset_inputs, add_settings
from equiav.settings.pretrain import AUDIO_AUGMENT_SWITCHES, RESUMABLE_CHANGES, PretrainSettings
from equiav.train.checkpoint import (
    Checkpointer,
    capture_rng_state,
    check_same_run,
    code_revision,
    export_weights,
    restore_rng_state,
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
    make_grad_scaler,
    resolve_precision,
    seed_everything,
    setup_distributed,
)
from equiav.train.data import (
    MODEL_INIT,
    DeviceAugmenter,
    GlobalBatchSampler,
    PretrainDataset,
    dataset_classes,
    make_loader,
)
from equiav.train.metric_log import MetricLogger

__all__ = ["METRICS", "Pretrainer", "add_arguments", "run", "train_flops_per_sample"]

log = logging.getLogger(__name__)

# Columns of metrics.csv after "step" (the 0-based iteration index).
METRICS: tuple[str, ...] = (
    "epoch",
    "loss",
    "inter",
    "intra_audio",
    "intra_visual",
    "acc_inter",
    "acc_intra_audio",
    "acc_intra_visual",
    "lr",
    "grad_norm",
    "samples_per_s",
    "tflops",
    "max_mem_gb",
)
_LOSS_KEYS = ("loss", "inter", "intra_audio", "intra_visual", "acc_inter", "acc_intra_audio", "acc_intra_visual")
# augment_chunk null: gcd(per-process batch, AUTO_AUGMENT_CHUNK) rows per augmentation generator.
AUTO_AUGMENT_CHUNK = 16


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _check_shapes(features: FeatureDataset, config: ModelConfig) -> None:
    """The stored features must be the model's input size (the clean view is not resized)."""
    attrs = features.shard_attrs
    pairs = (
        ("target_frames", "audio_frames"),
        ("num_mel_bins", "audio_freq_bins"),
        ("frame_size", "image_size"),
    )
    wrong = [f"{a}={attrs[a]} but model {m}={getattr(config, m)}" for a, m in pairs if attrs[a] != getattr(config, m)]
    if wrong:
        raise ValueError(
            f"the features of {features.paths[0]} do not fit the model: {'; '.join(wrong)}; set the model's "
            "sizes in the settings' `model` section to the feature settings"
        )


def _fingerprint(clip_ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(clip_ids).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Helpers of the loop
# --------------------------------------------------------------------------------------------


def train_flops_per_sample(config: ModelConfig) -> float:
    """Model FLOPs of one training sample (forward and backward of both views, the predictor
    and the heads; not the augmentations or the loss), counted on the meta device."""
    batch = 2
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = EquiAV(config)
        audio = torch.zeros(batch, config.audio_frames, config.audio_freq_bins)
        visual = torch.zeros(batch, 3, config.image_size, config.image_size)
        s = config.centroid_samples
        inputs = (
            audio, visual, audio, visual,
            torch.zeros(batch, config.audio_param_dim), torch.zeros(batch, config.visual_param_dim),
            torch.zeros(batch, s, config.audio_param_dim), torch.zeros(batch, s, config.visual_param_dim),
        )  # fmt: skip
        with FlopCounterMode(display=False) as counter:
            outputs = model(*inputs)
            torch.stack([o.sum() for o in outputs.values()]).sum().backward()
    return counter.get_total_flops() / batch


def _phase(strategy: str, step: int, total_steps: int) -> str:
    """Which loss terms iteration ``step`` trains: "joint", "intra" or "inter"."""
    if strategy == "joint":
        return "joint"
    if strategy == "two_stage":
        return "intra" if step < total_steps // 2 else "inter"
    return "intra" if step % 2 == 0 else "inter"


def _reachable_parameters(output: Tensor) -> set[int]:
    """ids of the leaf tensors (parameters) that ``output``'s autograd graph reaches."""
    reached: set[int] = set()
    seen: set[Any] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None:
            reached.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return reached


class _PhaseObjective:
    """The tensor to back-propagate for a phase, and which parameters the optimiser may update.

    A phase that trains only some terms still back-propagates the others with weight 0: under
    DDP (find_unused_parameters=False) every parameter must receive a gradient at every step.
    Those zero gradients must not reach AdamW, whose momentum and weight decay would still move
    the parameters, so after the backward pass the gradients of parameters the phase's terms do
    not reach are set to None (the graph walk is done once per phase).
    """

    def __init__(self, criterion: EquiAVLoss, parameters: Sequence[nn.Parameter]) -> None:
        self.criterion = criterion
        self.parameters = parameters
        self._reached: dict[str, set[int]] = {}

    def __call__(self, losses: Mapping[str, Tensor], phase: str) -> Tensor:
        if phase == "joint":
            return losses["loss"]
        c = self.criterion
        intra = c.weight_audio * losses["intra_audio"] + c.weight_visual * losses["intra_visual"]
        inter = c.weight_inter * losses["inter"]
        active, inactive = (intra, inter) if phase == "intra" else (inter, intra)
        if phase not in self._reached:
            self._reached[phase] = _reachable_parameters(active)
        return active + 0.0 * inactive

    def drop_inactive_gradients(self, phase: str) -> None:
        if phase == "joint":
            return
        reached = self._reached[phase]
        for parameter in self.parameters:
            if id(parameter) not in reached:
                parameter.grad = None


class _Window:
    """Sums of the step metrics since the last log line, kept on the device (no sync per step)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.steps = 0
        self.lr = math.nan  # of the window's last step
        self.paused_s = 0.0  # checkpoint writing, not training
        self.start = time.perf_counter()

    def add(self, values: Mapping[str, Tensor], lr: float) -> None:
        for key, value in values.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.steps += 1
        self.lr = lr

    def summary(self, global_batch: int, flops_per_sample: float, device: torch.device) -> dict[str, float]:
        """The logged values of the window (averaged over its steps and over all ranks: a
        collective), then a fresh window. Raises when the loss is no longer finite."""
        keys = sorted(self.sums)
        means = torch.stack([self.sums[k] for k in keys]) / self.steps
        if dist.is_initialized():
            dist.all_reduce(means)
            means /= dist.get_world_size()
        values = dict(zip(keys, means.tolist(), strict=True))
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(
                f"the loss is {values['loss']}: training diverged. Lower lr, use precision 'fp32' or "
                "'bf16', or resume from an earlier checkpoint"
            )
        seconds = time.perf_counter() - self.start - self.paused_s
        samples_per_s = global_batch * self.steps / seconds if seconds > 0 else math.nan
        values.update(
            lr=self.lr,
            samples_per_s=samples_per_s,
            # Achieved model TFLOP/s over all processes (no peak rate needed, unlike MFU).
            tflops=flops_per_sample * samples_per_s / 1e12,
            max_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan,
        )
        self.reset()
        return values


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


class Pretrainer:
    """One pre-training run: data, model, optimiser and the loop, resumable from ``work_dir``.

    Position in the run: ``step`` (iterations done), ``epoch`` and ``batch_in_epoch`` (global
    batches of that epoch already consumed). A checkpoint holds them with the model, optimiser,
    scheduler, gradient scaler, every rank's RNG states and the resolved configuration.
    """

    def __init__(
        self, settings: PretrainSettings, *, usable: Path, norm_stats: Path, out: Path, work_dir: Path, info: DistInfo
    ) -> None:
        self.settings, self.info, self.out, self.work_dir = settings, info, out, work_dir
        device = self.device = info.device
        self.precision = resolve_precision(settings.precision, device)
        self.model_config = config = settings.model_config()

        rows = read_usable(usable, settings.splits)
        self.norm = read_norm_stats(norm_stats)
        clip_ids = sorted(rows["clip_id"])
        shards = sorted(set(rows["h5"]))
        features = FeatureDataset(
            shards,
            dataset_classes(read_index(shards)["labels"]),
            mean=self.norm["mean"],
            std=self.norm["std"],
            splits=settings.splits,
            frame="random",
            clip_ids=clip_ids,
        )
        _check_shapes(features, config)
        self.dataset = PretrainDataset(
            features, seed=settings.seed, independent_visual_frame=settings.independent_visual_frame
        )
        self.sampler = GlobalBatchSampler(
            len(self.dataset), settings.batch_size, rank=info.rank, world_size=info.world_size, seed=settings.seed
        )
        chunk = settings.augment_chunk or math.gcd(self.sampler.local_batch, AUTO_AUGMENT_CHUNK)
        self.augmenter = DeviceAugmenter(
            seed=settings.seed,
            image_size=config.image_size,
            centroid_samples=config.centroid_samples,
            chunk=chunk,
            device=device,
            audio_config=settings.audio_augment_config(),
        )
        self.augmenter.check_batch(self.sampler.local_batch)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = settings.epochs * self.steps_per_epoch

        torch.manual_seed(derive_seed(settings.seed, MODEL_INIT))  # the same initial model on every rank
        self.model = EquiAV(config).to(device)
        seed_everything(settings.seed, info.rank)
        self.optimizer = build_optimizer(
            self.model, lr=settings.lr, weight_decay=settings.weight_decay, betas=settings.betas
        )
        self.scheduler = WarmupCosine(
            self.optimizer,
            peak_lr=settings.lr,
            total_steps=self.total_steps,
            warmup_steps=min(self.total_steps, int(settings.warmup_epochs * self.steps_per_epoch)),
            start_lr=settings.start_lr,
            min_lr=settings.min_lr,
        )
        self.scaler = make_grad_scaler(self.precision, device)
        self.criterion = EquiAVLoss(
            temperature=settings.temperature,
            weight_inter=settings.weight_inter,
            weight_audio=settings.weight_audio,
            weight_visual=settings.weight_visual,
            positive_in_denominator=settings.positive_in_denominator,
        )
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.objective = _PhaseObjective(self.criterion, self.parameters)
        self.checkpointer = Checkpointer(work_dir / "checkpoints", keep=settings.keep_checkpoints)
        self.resolved = {
            "settings": settings.to_dict(),
            "model_config": config.to_dict(),
            "norm": {"mean": self.norm["mean"], "std": self.norm["std"]},
            "data": {
                "clips": len(self.dataset),
                "clip_ids_sha256": _fingerprint(clip_ids),
                "steps_per_epoch": self.steps_per_epoch,
            },
        }
        self.revision = code_revision()
        self.step = self.epoch = self.batch_in_epoch = 0

    # ---- state -----------------------------------------------------------------------------

    def resume(self) -> Path | None:
        """Load the newest checkpoint of ``work_dir`` if there is one (else initialise from MAE
        when asked) and return its path."""
        latest = self.checkpointer.latest()
        if latest is None:
            if self.settings.mae_weights is not None:
                log.info(load_mae_weights(self.model, self.settings.mae_weights).summary())
            return None
        state = self.checkpointer.load(latest)
        # Checkpoints from before `audio_augment` existed could only have trained with the fixes.
        state["config"]["settings"].setdefault("audio_augment", {name: False for name in AUDIO_AUGMENT_SWITCHES})
        check_same_run(
            state["config"],
            self.resolved,
            where=latest,
            start_afresh="start afresh with another --work-dir (--max-steps may always change)",
            ignore=[f"settings.{name}" for name in RESUMABLE_CHANGES],
        )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        rng = state["rng"]
        if len(rng) == self.info.world_size:
            restore_rng_state(rng[self.info.rank])
        else:
            # Only dropout-like layers read these generators; data and augmentation streams are keyed.
            log.warning(
                "the checkpoint has RNG states of %d process(es), this run has %d: reseeding",
                len(rng),
                self.info.world_size,
            )
            seed_everything(derive_seed(self.settings.seed, self.step), self.info.rank)
        log.info(
            "resuming from %s at step %d/%d (epoch %d, batch %d)",
            latest, self.step, self.total_steps, self.epoch, self.batch_in_epoch,
        )  # fmt: skip
        return latest

    def write_run_info(self, resumed_from: Path | None) -> None:
        """``work_dir/config.json``: the resolved configuration and where this run executes."""
        if not self.info.is_main:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        run_info = {
            **self.resolved,
            "code_revision": self.revision,
            "world_size": self.info.world_size,
            "device": str(self.device),
            "precision": self.precision,
            "augment_chunk": self.augmenter.chunk,
            "total_steps": self.total_steps,
            "resumed_from": str(resumed_from) if resumed_from else None,
        }
        write_json(self.work_dir / "config.json", run_info)

    def save_checkpoint(self) -> None:
        """Checkpoint the current position (a collective: every rank sends its RNG states)."""
        rng: list[Any] = [capture_rng_state()]
        if dist.is_initialized():
            rng = [None] * self.info.world_size
            dist.all_gather_object(rng, capture_rng_state())
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "config": self.resolved,
            "code_revision": self.revision,
            "world_size": self.info.world_size,
        }
        self.checkpointer.save(state, self.step)

    def export(self) -> None:
        """Write ``--out`` (rank 0) and wait for it on every rank."""
        if self.info.is_main:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            extra = {
                "origin": {"type": "pretrain", "seed": self.settings.seed},
                "settings": self.settings.to_dict(),
                "norm_stats": self.norm,
                "code_revision": self.revision,
                "steps": self.step,
                "total_steps": self.total_steps,
            }
            export_weights(self.model, self.out, config=self.model_config.to_dict(), extra=extra)
            log.info("wrote %s after %d steps", self.out, self.step)
        if dist.is_initialized():
            dist.barrier()

    # ---- the loop --------------------------------------------------------------------------

    def _wrapped_model(self) -> nn.Module:
        model: nn.Module = self.model
        if self.settings.compile:
            if self.device.type == "cuda":
                model = torch.compile(model)
            else:
                log.info("compile=true is ignored on %s (torch.compile is used on CUDA only)", self.device)
        if self.info.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        return model

    def _train_step(self, model: nn.Module, batch: dict[str, Any]) -> tuple[dict[str, Tensor], float]:
        """One optimiser step on this rank's slice of the global batch. Returns the losses,
        accuracies and ``grad_norm`` (tensors, not synchronised) and the learning rate."""
        phase = _phase(self.settings.strategy, self.step, self.total_steps)
        views = self.augmenter(batch, self.step, self.info.rank * self.sampler.local_batch)
        with autocast(self.precision, self.device):
            outputs = model(*views.model_inputs())
        losses = self.criterion(outputs)  # float32 whatever the autocast dtype
        self.scaler.scale(self.objective(losses, phase)).backward()
        self.objective.drop_inactive_gradients(phase)
        lr = self.scheduler.step()
        self.scaler.unscale_(self.optimizer)  # clip the true gradients (a no-op unless fp16)
        clip = self.settings.clip_grad if self.settings.clip_grad is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return {**{k: losses[k] for k in _LOSS_KEYS}, "grad_norm": grad_norm}, lr

    def run(self, *, max_steps: int | None, stop: StopSignal) -> int:
        """Train from the current position to the end (or ``max_steps``); the exit code."""
        end_step = self.total_steps if max_steps is None else min(self.total_steps, max_steps)
        if self.step >= end_step:
            self.export()
            return 0
        model = self._wrapped_model()
        # Stop flags travel over gloo so that the per-step agreement never waits on the GPU stream.
        control = dist.new_group(backend="gloo") if dist.is_initialized() and dist.get_backend() != "gloo" else None
        loader = make_loader(
            self.dataset,
            self.sampler,
            num_workers=self.settings.num_workers,
            pin_memory=self.device.type == "cuda",
            seed=self.settings.seed,
            rank=self.info.rank,
        )
        flops = train_flops_per_sample(self.model_config) if self.info.is_main else 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        log.info(
            "pre-training %d steps (%d per epoch x %d epochs; this run stops at %d) on %d process(es), %s, %s",
            self.total_steps, self.steps_per_epoch, self.settings.epochs, end_step, self.info.world_size,
            self.device, self.precision,
        )  # fmt: skip

        window = _Window()
        self.model.train()
        with MetricLogger(
            self.work_dir / "metrics.csv",
            tensorboard_dir=self.work_dir / "tensorboard",
            total_steps=end_step,
            resume_step=self.step,
            enabled=self.info.is_main,
        ) as logger:
            while self.step < end_step:
                self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
                for batch in loader:
                    iteration = self.step
                    window.add(*self._train_step(model, batch))
                    self.step += 1
                    self.batch_in_epoch += 1
                    if self.batch_in_epoch == self.steps_per_epoch:
                        self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                    if self.step % self.settings.log_every == 0 or self.step == end_step:
                        values = window.summary(self.settings.batch_size, flops, self.device)
                        values["epoch"] = self.step / self.steps_per_epoch
                        logger.log(iteration, {key: values[key] for key in METRICS})

                    signum = any_rank(stop.signum or 0, control)
                    if self.step % self.settings.checkpoint_every == 0 or self.step == end_step or signum:
                        started = time.perf_counter()
                        self.save_checkpoint()
                        window.paused_s += time.perf_counter() - started
                    if signum and self.step < end_step:
                        if dist.is_initialized():
                            dist.barrier()  # no rank exits while rank 0 still writes
                        log.warning(
                            "stopped by signal %d at step %d; its checkpoint resumes the run", signum, self.step
                        )
                        return 128 + signum
                    if self.step == end_step:
                        break
        self.export()
        return 0


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``equiav pretrain``."""
    add_settings(p, "pre-training settings (PretrainSettings)")
    add_dataset_inputs(p, classes=False)
    p.add_argument("--out", required=True, type=Path, help="final weights, written when training completes")
    p.add_argument("--work-dir", required=True, type=Path, help="checkpoints, metrics.csv, TensorBoard, config")
    p.add_argument("--max-steps", type=int, default=None, help="stop (and export) after this many steps (default: all)")


def run(args: argparse.Namespace) -> int:
    """The body of ``equiav pretrain`` (logging is set up by equiav.cli)."""
    if args.max_steps is not None and args.max_steps < 1:
        raise SystemExit(f"--max-steps must be >= 1, got {args.max_steps}")
    settings = PretrainSettings.from_dict(args.settings)
    deterministic = torch.are_deterministic_algorithms_enabled()
    with StopSignal() as stop:
        info = setup_distributed()
        try:
            if info.device.type == "cpu":
                # Exact resumption on the CPU; on CUDA determinism would cost speed for nothing
                # that resuming needs (the checkpoint carries the state, not a replay).
                torch.use_deterministic_algorithms(True)
            else:
                torch.set_float32_matmul_precision("high")
            if not info.is_main:
                logging.getLogger("equiav").setLevel(logging.WARNING)
            trainer = Pretrainer(
                settings,
                usable=args.usable,
                norm_stats=args.norm_stats,
                out=args.out,
                work_dir=args.work_dir,
                info=info,
            )
            trainer.write_run_info(trainer.resume())
            return trainer.run(max_steps=args.max_steps, stop=stop)
        finally:
            torch.use_deterministic_algorithms(deterministic)
            cleanup_distributed()

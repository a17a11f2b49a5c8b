"""Pre-training batches: HDF5 shards -> global batches -> augmented views on the device.

Everything random here is a pure function of (seed, epoch or step, position), never of the
process layout, so that

* a run resumed from a checkpoint draws exactly what the uninterrupted run would have drawn,
  even mid-epoch (the consumed batches of the epoch's order are skipped, not re-drawn), and
* W processes with per-process batch B draw exactly what one process with batch N = W * B draws.

Three streams, each keyed with :func:`equiav.train.common.derive_seed`:

* **order**: one permutation of the data set per epoch, keyed (seed, ORDER, epoch). Global batch
  k is positions [k N, (k+1) N) of it and rank r takes the contiguous slice [r B, (r+1) B), so
  gathering the ranks' rows in rank order (as the losses do) rebuilds the single-process batch
  row for row. (torch's DistributedSampler deals indices out round-robin, which puts a
  different row order in the gathered batch.)
* **frame**: the picture of a clip, one of its stored frames uniformly, keyed
  (seed, FRAME, epoch, clip index); with ``independent_visual_frame`` a second, independent
  draw keyed (seed, FRAME_AUG, epoch, clip index) feeds the augmented view (the release).
* **augmentation**: the augmentations and the S centroid vectors of global-batch chunk j of
  step s, keyed (seed, AUGMENT, s, j), in chunks of ``augment_chunk`` rows. AudioAugment and
  VisualAugment draw a batch's parameters from one generator, so a chunk, not a row, is the
  unit whose draws do not depend on the batch split; the per-process batch must be a
  multiple of the chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from equiav.augment import AudioAugment, AudioAugmentConfig, VisualAugment, VisualAugmentConfig, normalize_image
from equiav.data.store import FeatureDataset
from equiav.train.common import derive_seed, loader_worker_init

__all__ = [
    "AUGMENT",
    "FRAME",
    "FRAME_AUG",
    "LOADER",
    "MODEL_INIT",
    "ORDER",
    "DeviceAugmenter",
    "GlobalBatchSampler",
    "PretrainDataset",
    "PretrainViews",
    "dataset_classes",
    "make_loader",
]

# Stream tags of derive_seed: which random choice a seed belongs to (MODEL_INIT: the initial
# weights, drawn by the trainer, the same on every rank; LOADER: the DataLoader's own generator).
# Tag 0 is seed_everything's.
ORDER, FRAME, FRAME_AUG, AUGMENT, MODEL_INIT, LOADER = 1, 2, 3, 4, 5, 6

Key = tuple[int, int]  # (clip index in the data set, epoch): what the sampler hands the data set


class PretrainDataset(Dataset):
    """One pre-training example per key (clip index, epoch).

    Items: ``fbank`` float32 [T, F] (normalised), ``frames`` uint8 [3, H, W] (one stored frame,
    drawn from the frame stream), ``frames_aug`` uint8 [3, H, W] only with
    ``independent_visual_frame``, ``index`` int.

    The frame is drawn by :class:`FeatureDataset` (``frame="random"``) from torch's global
    generator; it is seeded per key inside ``torch.random.fork_rng`` so the choice is
    reproducible and nothing else sees the reseeding.
    """

    def __init__(self, features: FeatureDataset, *, seed: int, independent_visual_frame: bool = False) -> None:
        if features.frame != "random":
            raise ValueError(
                f"PretrainDataset needs a FeatureDataset with frame='random', got frame={features.frame!r}"
            )
        if features.shard_attrs["num_frames"] < 1:
            raise ValueError(
                f"the shards of {features.paths[0]} hold no video frames (num_frames=0); pre-training needs "
                "audio-visual features"
            )
        self.features = features
        self.seed = seed
        self.independent_visual_frame = independent_visual_frame

    def __len__(self) -> int:
        return len(self.features)

    def _read(self, index: int, stream: int, epoch: int) -> dict[str, Any]:
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also reseed CUDA, outside fork_rng's reach.
            torch.default_generator.manual_seed(derive_seed(self.seed, stream, epoch, index))
            return self.features[index]

    def __getitem__(self, key: Key) -> dict[str, Any]:
        index, epoch = key
        item = self._read(index, FRAME, epoch)
        out = {"fbank": item["fbank"], "frames": item["frames"], "index": index}
        if self.independent_visual_frame:
            out["frames_aug"] = self._read(index, FRAME_AUG, epoch)["frames"]
        return out


class GlobalBatchSampler(Sampler[list[Key]]):
    """This rank's slice of every global batch of an epoch (a DataLoader ``batch_sampler``).

    Epoch e's order is a permutation of the data set keyed (seed, ORDER, e); global batch k is
    positions [k N, (k+1) N) and this rank gets rows [rank B, (rank+1) B) of it, B = N / W. The
    incomplete last global batch is dropped. :meth:`set_epoch` chooses the epoch and the first
    global batch to yield (the batches a resumed run already consumed are skipped).
    """

    def __init__(self, dataset_size: int, global_batch: int, *, rank: int, world_size: int, seed: int) -> None:
        if global_batch % world_size:
            raise ValueError(
                f"the global batch {global_batch} does not divide among {world_size} processes; "
                "choose batch_size as a multiple of the number of GPUs"
            )
        if dataset_size < global_batch:
            raise ValueError(
                f"the data set has {dataset_size} clips, fewer than one global batch of {global_batch}; "
                "use a smaller batch_size or more data"
            )
        self.dataset_size = dataset_size
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.rank = rank
        self.seed = seed
        self.batches_per_epoch = dataset_size // global_batch
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate over ``epoch``'s order from global batch ``start_batch`` on (call before each epoch)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must lie in [0, {self.batches_per_epoch}], got {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def order(self, epoch: int) -> Tensor:
        """The epoch's permutation of the data set, int64 [dataset_size]."""
        generator = torch.Generator().manual_seed(derive_seed(self.seed, ORDER, epoch))
        return torch.randperm(self.dataset_size, generator=generator)

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[Key]]:
        order = self.order(self.epoch).tolist()
        for batch in range(self.start_batch, self.batches_per_epoch):
            first = batch * self.global_batch + self.rank * self.local_batch
            yield [(index, self.epoch) for index in order[first : first + self.local_batch]]


def make_loader(
    dataset: PretrainDataset,
    sampler: GlobalBatchSampler,
    *,
    num_workers: int,
    pin_memory: bool,
    seed: int,
    rank: int,
) -> DataLoader:
    """The training DataLoader: ``sampler`` as batch sampler, pinned memory for CUDA, persistent
    workers (when any) that keep their HDF5 handles across epochs, and worker seeds from a
    generator of their own, so that creating an iterator never consumes the global torch RNG
    (which a resumed run restores from its checkpoint)."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=loader_worker_init,
        generator=torch.Generator().manual_seed(derive_seed(seed, LOADER, rank)),
        prefetch_factor=4 if num_workers > 0 else None,
    )


@dataclass(frozen=True)
class PretrainViews:
    """The model inputs of one step (B rows on this process, on the training device).

    audio, audio_aug: float32 [B, T, F]; visual, visual_aug: float32 ImageNet-normalised
    [B, 3, H, W]; audio_params [B, 24], visual_params [B, 18]: the applied augmentations;
    audio_centroid [B, S, 24], visual_centroid [B, S, 18]: S vectors drawn without augmenting.
    """

    audio: Tensor
    audio_aug: Tensor
    visual: Tensor
    visual_aug: Tensor
    audio_params: Tensor
    visual_params: Tensor
    audio_centroid: Tensor
    visual_centroid: Tensor

    def model_inputs(self) -> tuple[Tensor, ...]:
        """Positional arguments of ``EquiAV.forward``."""
        return (
            self.audio,
            self.visual,
            self.audio_aug,
            self.visual_aug,
            self.audio_params,
            self.visual_params,
            self.audio_centroid,
            self.visual_centroid,
        )


class DeviceAugmenter:
    """Augment a collated batch on the training device, reproducibly per (step, chunk).

    ``__call__(batch, step, offset)``: ``batch`` from the loader (``fbank`` [B, T, F],
    ``frames`` uint8 [B, 3, H, W], optional ``frames_aug``), ``offset`` = this rank's first row
    in the global batch (rank * B). Chunk j of the rows (global chunk (offset / chunk) + j) is
    augmented with a CPU generator seeded (seed, AUGMENT, step, global chunk): one generator
    makes the chunk's audio augmentation, visual augmentation and centroid vectors, in that
    order. The draws happen on the CPU (a handful of numbers per row, no device sync) and the
    heavy work runs where the data is: on a GPU in one call for all the rows.
    """

    def __init__(
        self,
        *,
        seed: int,
        image_size: int,
        centroid_samples: int,
        chunk: int,
        device: torch.device,
        audio_config: AudioAugmentConfig | None = None,
        visual_config: VisualAugmentConfig | None = None,
    ) -> None:
        if chunk < 1:
            raise ValueError(f"augment_chunk must be >= 1, got {chunk}")
        visual_config = visual_config or VisualAugmentConfig()
        if visual_config.size != image_size:
            visual_config = dataclasses.replace(visual_config, size=image_size)
        self.audio = AudioAugment(audio_config or AudioAugmentConfig())
        self.visual = VisualAugment(visual_config)
        self.seed = seed
        self.centroid_samples = centroid_samples
        self.chunk = chunk
        self.device = device

    def check_batch(self, local_batch: int) -> None:
        """Refuse a per-process batch that chunks do not tile."""
        if local_batch % self.chunk:
            divisors = [d for d in range(1, local_batch + 1) if local_batch % d == 0]
            raise ValueError(
                f"the per-process batch {local_batch} is not a multiple of augment_chunk={self.chunk}; "
                f"choose augment_chunk among {divisors} (the same value on every run that must match)"
            )

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], step: int, offset: int) -> PretrainViews:
        device = self.device
        fbank = batch["fbank"].to(device, non_blocking=True)
        frames = batch["frames"].to(device, non_blocking=True)
        frames_aug = batch["frames_aug"].to(device, non_blocking=True) if "frames_aug" in batch else frames
        rows = fbank.shape[0]
        self.check_batch(rows)
        if offset % self.chunk:
            raise ValueError(f"offset {offset} is not a multiple of augment_chunk={self.chunk}")
        chunk, samples = self.chunk, self.centroid_samples
        generators = [
            torch.Generator().manual_seed(derive_seed(self.seed, AUGMENT, step, offset // chunk + j))
            for j in range(rows // chunk)
        ]
        # Each chunk's generator makes, in this order, the chunk's audio augmentation, visual
        # augmentation and centroid vectors. On a GPU one call augments all rows (a few hundred
        # kernel launches instead of as many per chunk); on the CPU a chunk's tensors stay in the
        # cache, which makes chunk-by-chunk calls 2.6x faster (batch 128). Both give the same bits.
        per_call = len(generators) if fbank.device.type == "cuda" else 1
        parts = []
        for first in range(0, len(generators), per_call):
            group = generators[first : first + per_call]
            rows_here = slice(first * chunk, (first + len(group)) * chunk)
            parts.append((*self.audio(fbank[rows_here], group), *self.visual(frames_aug[rows_here], group)))
        audio_aug, audio_params, visual_aug, visual_params = (torch.cat(t) for t in zip(*parts, strict=True))
        audio_centroid = torch.cat(
            [self.audio.sample_params(chunk, samples, *fbank.shape[1:], generator=g, device=device) for g in generators]
        )
        visual_centroid = torch.cat(
            [
                self.visual.sample_params(chunk, samples, *frames.shape[-2:], generator=g, device=device)
                for g in generators
            ]
        )
        return PretrainViews(
            audio=fbank,
            audio_aug=audio_aug,
            visual=normalize_image(frames),
            visual_aug=visual_aug,
            audio_params=audio_params,
            visual_params=visual_params,
            audio_centroid=audio_centroid,
            visual_centroid=visual_centroid,
        )


def dataset_classes(labels: Sequence[str]) -> list[str]:
    """Every class id named in ``labels`` (";"-joined strings), sorted: FeatureDataset resolves
    labels against a class list, which pre-training does not otherwise need."""
    return sorted({name for value in labels for name in str(value).split(";") if name})

"""What the data stage hands to training and evaluation: usable.csv, classes.csv and
norm_stats.json (``DatasetInputs``), and the model config fitted to the stored features."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from equiav.data.store import FeatureDataset
from equiav.settings.model import ModelConfig

log = logging.getLogger(__name__)

USABLE_COLUMNS = frozenset({"clip_id", "split", "labels", "h5"})


def read_usable(path: str | os.PathLike[str], splits: Sequence[str] | None = None) -> pd.DataFrame:
    """The usable clips (the availability stage's usable.csv), only those of ``splits`` if given."""
    usable = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = USABLE_COLUMNS - set(usable.columns)
    if missing:
        raise ValueError(f"{path} lacks the column(s) {sorted(missing)}; give the usable.csv of the availability stage")
    if splits is None:
        return usable
    rows = usable[usable["split"].isin(list(splits))]
    if rows.empty:
        raise ValueError(
            f"{path} has no clip in split(s) {list(splits)}; its splits are {sorted(set(usable['split']))}"
        )
    return rows


def read_norm_stats(path: str | os.PathLike[str]) -> dict[str, Any]:
    """norm_stats.json of the data stage; ``mean`` and ``std`` are the statistics to normalise with."""
    stats = json.loads(Path(path).read_text())
    for key in ("mean", "std"):
        if not isinstance(stats.get(key), (int, float)):
            raise ValueError(f"{path} needs a number under {key!r} (the norm_stats.json of the data stage)")
    return stats


@dataclass(frozen=True)
class DatasetInputs:
    """What the evaluation stages read of a data set: the usable-clip table (``usable.csv`` of
    the availability stage: clip_id, split, labels, h5, ...), the class ids in class order
    (``classes.csv``: index, id, name) and the fbank normalisation (``norm_stats.json``)."""

    usable: pd.DataFrame
    classes: list[str]
    mean: float
    std: float

    @classmethod
    def load(
        cls, usable: str | os.PathLike[str], classes: str | os.PathLike[str], norm_stats: str | os.PathLike[str]
    ) -> DatasetInputs:
        table = read_usable(usable)
        class_table = pd.read_csv(classes, dtype={"id": str}, keep_default_na=False)
        if not {"index", "id"} <= set(class_table.columns):
            raise ValueError(f"{classes} must have columns index, id (the manifest stage's classes.csv)")
        class_ids = class_table.sort_values("index")["id"].tolist()
        stats = read_norm_stats(norm_stats)
        return cls(table, class_ids, float(stats["mean"]), float(stats["std"]))

    def shards(self, splits: Sequence[str] | None = None) -> list[str]:
        """The HDF5 shards holding clips of ``splits`` (all shards for None), sorted."""
        rows = self.usable if splits is None else self.usable[self.usable["split"].isin(list(splits))]
        if rows.empty:
            found = sorted(set(self.usable["split"]))
            raise ValueError(f"no usable clip in split(s) {list(splits or [])}; the usable clips are in {found}")
        return sorted(set(rows["h5"]))

    def dataset(
        self, splits: Sequence[str] | None, frame: str, clip_ids: Sequence[str] | None = None
    ) -> FeatureDataset:
        """A :class:`FeatureDataset` over the clips of ``splits`` (every split for None)."""
        return FeatureDataset(
            self.shards(splits),
            self.classes,
            mean=self.mean,
            std=self.std,
            splits=splits,
            frame=frame,
            clip_ids=clip_ids,
        )


def fit_config_to_data(
    config: ModelConfig, shard_attrs: Mapping[str, int], *, audio: bool, visual: bool
) -> ModelConfig:
    """The pre-trained model's config with its audio length set to the data's.

    The positional embeddings are fixed sin-cos tables rebuilt from the config, so a tower
    pre-trained on 1024 frames runs unchanged on 512-frame ESC-50 or 128-frame SPC-v1 clips
    (shorter inputs, fewer tokens) instead of padding them. Mel bins and frame size must match.
    """
    if audio:
        bins = int(shard_attrs["num_mel_bins"])
        if bins != config.audio_freq_bins:
            raise ValueError(
                f"the features have {bins} mel bins but the model was pre-trained on {config.audio_freq_bins}; "
                "extract features with the pre-training's num_mel_bins"
            )
        frames = int(shard_attrs["target_frames"])
        if frames != config.audio_frames:
            log.info(
                "audio length: the model was pre-trained on %d frames, the data have %d", config.audio_frames, frames
            )
            config = config.replace(audio_frames=frames)  # validates the patch multiple
    if visual:
        if int(shard_attrs["num_frames"]) == 0:
            raise ValueError(
                "the features hold no video frames (num_frames=0), so nothing visual can run on this data set; "
                "fine-tune it with modality 'audio'"
            )
        size = int(shard_attrs["frame_size"])
        if size != config.image_size:
            raise ValueError(
                f"the frames are {size} px but the model takes {config.image_size} px; extract features with "
                f"frame_size {config.image_size}"
            )
    return config

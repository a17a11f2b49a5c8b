"""Embeddings of video files with a pre-trained EquiAV (``equiav embed``, ``equiav retrieve``).

:func:`embed_files` decodes each file with one ffmpeg pass (:func:`equiav.data.media.decode_clip`),
turns it into the model's inputs exactly as the feature and evaluation stages do, and returns
per clip:

* ``audio_pooled`` / ``visual_pooled`` [D]: the mean of the encoder's output tokens;
* ``audio_inter`` / ``visual_inter`` [E]: the inter-modal embedding ``EquiAV.encode`` returns,
  the centroid of S predicted embeddings (method.md section 8), the vectors that audio-visual
  retrieval compares by cosine similarity. Stored un-normalised, as the model returns them.

Inputs follow the checkpoint's model config: the Kaldi fbank has ``audio_freq_bins`` mel bins
and is padded or cut to ``audio_frames``, normalised ``(x - mean) / std`` with the statistics
stored in the checkpoint; the picture is frame 5 of 10 uniformly spaced frames (method.md:
evaluation uses the middle frame) at ``image_size`` pixels, JPEG round-tripped like the stored
features, then ImageNet-normalised.

The S centroid parameter vectors are drawn once from ``seed`` with
:func:`equiav.eval.retrieval.draw_centroid_params` and shared by every clip, so a clip's
embedding depends only on the file, the checkpoint, ``seed`` and ``samples``: never on the other
files or their order. (The ``retrieval`` stage draws separate vectors per clip position; the
two differ by the Monte-Carlo noise of the centroid.)

A file without an audio or a video stream, or one that cannot be decoded, is skipped with a
logged message and listed in :attr:`Embeddings.failures`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.io
from torch import Tensor

from equiav.atomic import atomic_output
from equiav.augment import normalize_image
from equiav.data.features import FeatureSettings, fbank
from equiav.data.media import MediaError, decode_clip
from equiav.data.status import DECODE_ERROR, NO_AUDIO, NO_VIDEO, TOO_SHORT
from equiav.eval.retrieval import draw_centroid_params
from equiav.model import EquiAV, ModelConfig
from equiav.train.checkpoint import load_export
from equiav.train.imported import release_weights

__all__ = [
    "AUDIOSET_MEAN",
    "AUDIOSET_STD",
    "EVAL_FRAME",
    "EVAL_NUM_FRAMES",
    "VIDEO_EXTENSIONS",
    "EmbedOptions",
    "EmbeddingModel",
    "Embeddings",
    "collect_inputs",
    "embed_files",
    "load_embedding_model",
    "load_embeddings",
    "rank_clips",
    "save_embeddings",
]

log = logging.getLogger(__name__)

#: The paper's AudioSet fbank statistics: the fallback for checkpoints that carry none.
AUDIOSET_MEAN = -4.346
AUDIOSET_STD = 4.332
#: Frames spread uniformly over the clip, and the one evaluation uses (method.md: frame 5).
EVAL_NUM_FRAMES = 10
EVAL_FRAME = EVAL_NUM_FRAMES // 2
#: What a folder input contributes: its files with these extensions (case-insensitive).
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".m4v", ".mkv", ".webm", ".mov", ".avi", ".flv", ".mpg", ".mpeg", ".ts", ".3gp", ".ogv", ".wmv"}
)
DIRECTIONS = ("a2v", "v2a")

_SAMPLE_RATE = 16000
_ARRAYS = ("audio_pooled", "visual_pooled", "audio_inter", "visual_inter")


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class Embeddings:
    """Embeddings of N clips, row i belonging to ``clip_ids[i]`` (file ``paths[i]``).

    ``audio_pooled`` / ``visual_pooled``: float32 [N, D] mean encoder tokens;
    ``audio_inter`` / ``visual_inter``: float32 [N, E] inter-modal centroid embeddings
    (un-normalised; :meth:`similarity` normalises them).
    ``failures``: (path, status, message) of every file that could not be embedded, status from
    :mod:`equiav.data.status` (``no-audio``, ``no-video``, ``too-short``, ``decode-error``).
    ``info``: how they were made (checkpoint, seed, samples, norm statistics, model config).
    """

    clip_ids: list[str]
    paths: list[str]
    audio_pooled: np.ndarray
    visual_pooled: np.ndarray
    audio_inter: np.ndarray
    visual_inter: np.ndarray
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.clip_ids)

    def similarity(self, direction: str = "a2v") -> np.ndarray:
        """Cosine similarities [N, N] of the inter-modal embeddings: row i is clip i's audio
        ("a2v") or picture ("v2a") against every clip's other modality."""
        queries, keys = _direction_arrays(self, self, direction)
        return queries @ keys.T


def _normalised(x: np.ndarray) -> np.ndarray:
    return F.normalize(torch.from_numpy(np.asarray(x, dtype=np.float32)), dim=-1).numpy()


def _direction_arrays(query: Embeddings, keys: Embeddings, direction: str) -> tuple[np.ndarray, np.ndarray]:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; choose a2v (audio query, picture keys) or v2a")
    q, k = ("audio_inter", "visual_inter") if direction == "a2v" else ("visual_inter", "audio_inter")
    return _normalised(getattr(query, q)), _normalised(getattr(keys, k))


def save_embeddings(embeddings: Embeddings, path: str | os.PathLike[str]) -> Path:
    """Write ``embeddings`` as a NumPy ``.npz`` (no pickled objects) and return its path.

    Arrays: ``clip_ids``, ``paths`` (str [N]), ``audio_pooled``, ``visual_pooled``,
    ``audio_inter``, ``visual_inter`` (float32), ``failed_paths``, ``failed_status``,
    ``failed_message`` (str [F]) and ``info`` (a JSON string). Read it back with
    :func:`load_embeddings` or plain ``np.load``.
    """

    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"embeddings are written as .npz; got {str(path)!r} (name the file e.g. embeddings.npz)")
    path.parent.mkdir(parents=True, exist_ok=True)
    failures = embeddings.failures
    arrays: dict[str, np.ndarray] = {
        "clip_ids": np.asarray(embeddings.clip_ids, dtype=str),
        "paths": np.asarray(embeddings.paths, dtype=str),
        **{name: np.asarray(getattr(embeddings, name), dtype=np.float32) for name in _ARRAYS},
        "failed_paths": np.asarray([f[0] for f in failures], dtype=str),
        "failed_status": np.asarray([f[1] for f in failures], dtype=str),
        "failed_message": np.asarray([f[2] for f in failures], dtype=str),
        "info": np.asarray(json.dumps(embeddings.info)),
    }
    with atomic_output(path) as tmp:
        np.savez(tmp, **arrays)
    return path


def load_embeddings(path: str | os.PathLike[str]) -> Embeddings:
    """Read a file written by :func:`save_embeddings`."""

    with np.load(path, allow_pickle=False) as data:
        failures = list(
            zip(
                data["failed_paths"].tolist(),
                data["failed_status"].tolist(),
                data["failed_message"].tolist(),
                strict=True,
            )
        )
        return Embeddings(
            clip_ids=data["clip_ids"].tolist(),
            paths=data["paths"].tolist(),
            **{name: data[name] for name in _ARRAYS},
            failures=failures,
            info=json.loads(str(data["info"])),
        )


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingModel:
    """A loaded checkpoint: the model (eval mode, on ``device``), its config and the fbank
    normalisation statistics its inputs need."""

    model: EquiAV
    config: ModelConfig
    mean: float
    std: float
    checkpoint: str
    device: torch.device

    @property
    def feature_settings(self) -> FeatureSettings:
        """The fbank and frame settings of this model's inputs."""
        return FeatureSettings(
            sample_rate=_SAMPLE_RATE,
            num_mel_bins=self.config.audio_freq_bins,
            target_frames=self.config.audio_frames,
            num_frames=EVAL_NUM_FRAMES,
            frame_size=self.config.image_size,
        )


def _stored_norm(state: Mapping[str, Any]) -> tuple[float, float] | None:
    """(mean, std) of an export of this project: ``norm_stats`` (pre-training) or ``norm``."""
    for key in ("norm_stats", "norm"):
        stats = state.get(key)
        if (
            isinstance(stats, Mapping)
            and isinstance(stats.get("mean"), (int, float))
            and isinstance(stats.get("std"), (int, float))
        ):
            return float(stats["mean"]), float(stats["std"])
    return None


def load_embedding_model(
    checkpoint: str | os.PathLike[str],
    *,
    release: bool = False,
    mean: float | None = None,
    std: float | None = None,
    device: str | torch.device = "cpu",
    release_config: ModelConfig | None = None,
) -> EmbeddingModel:
    """Load the weights that :func:`embed_files` runs.

    Args:
        checkpoint: this project's exported weights (``model.pt`` of the pre-train stage: keys
            ``model``, ``model_config``, ``norm_stats``), or with ``release=True`` a state dict
            saved by the authors' release (``__M__.`` keys, optionally under ``"model"``).
        release: convert a release checkpoint (model config ``release_config``, default
            ``ModelConfig.vit_base()``, the released ViT-B/16 with 1024-frame audio).
        mean, std: fbank normalisation; default the checkpoint's own statistics, else (release
            checkpoints, exports without them) AudioSet's -4.346 / 4.332 with a warning.
    """
    path = Path(checkpoint)
    if release:
        config = release_config or ModelConfig.vit_base()
        weights = release_weights(path)
        stored = None
    else:
        state = load_export(path)
        config = ModelConfig.from_dict(dict(state["model_config"]))
        weights = state["model"]
        stored = _stored_norm(state)

    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (the fbank normalisation) or neither")
    if mean is None or std is None:
        if stored is None:
            mean, std = AUDIOSET_MEAN, AUDIOSET_STD
            log.warning(
                "%s carries no fbank normalisation statistics; using AudioSet's mean %.3f, std %.3f "
                "(pass mean/std, --mean/--std, for other data)",
                path,
                mean,
                std,
            )
        else:
            mean, std = stored
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"need a finite mean and std > 0 for the fbank normalisation, got {mean!r}, {std!r}")

    model = EquiAV(config)
    model.load_state_dict(weights)
    device = torch.device(device)
    model.to(device).eval()
    return EmbeddingModel(model, config, float(mean), float(std), str(path), device)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def collect_inputs(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files to embed: each file as given, and each folder's video files (by extension,
    not recursive, sorted by name). Duplicates keep their first place."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            videos = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
            if not videos:
                raise ValueError(
                    f"folder {str(path)!r} holds no video file ({', '.join(sorted(VIDEO_EXTENSIONS))}); "
                    "name files explicitly to embed other kinds"
                )
            found.extend(videos)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"input {str(path)!r} is neither a file nor a folder")
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def _clip_ids(paths: Sequence[Path]) -> list[str]:
    """File stems; where two files share a stem, their full paths."""
    stems = [p.stem for p in paths]
    repeated = {s for s in stems if stems.count(s) > 1}
    return [str(p) if p.stem in repeated else p.stem for p in paths]


@dataclass
class _Decoded:
    fbank: Tensor | None = None  # float32 [T, F], normalised
    frame: Tensor | None = None  # uint8 [3, H, W]
    status: str = ""
    message: str = ""


def _prepare(path: Path, model: EmbeddingModel, offset: float, duration: float | None) -> _Decoded:
    """One file -> normalised fbank and the evaluation frame; a failure as (status, message)."""
    settings = model.feature_settings
    try:
        clip = decode_clip(
            path,
            offset,
            duration,
            sample_rate=settings.sample_rate,
            num_frames=settings.num_frames,
            frame_size=settings.frame_size,
            jpeg_quality=settings.jpeg_quality,
        )
        feats, _ = fbank(clip.waveform, settings)
    except MediaError as err:
        return _Decoded(status=err.status, message=_failure_message(path, err.status, err.detail))
    except ValueError as err:  # fbank: less audio than one analysis window
        return _Decoded(status=TOO_SHORT, message=f"{path}: {err}")
    except Exception as err:  # one bad file must not lose the others
        log.debug("decoding %s failed", path, exc_info=True)
        return _Decoded(status=DECODE_ERROR, message=f"{path}: {type(err).__name__}: {err}")
    jpeg = torch.frombuffer(bytearray(clip.frames[EVAL_FRAME]), dtype=torch.uint8)
    frame = torchvision.io.decode_jpeg(jpeg, mode=torchvision.io.ImageReadMode.RGB)
    return _Decoded(fbank=(feats.float() - model.mean) / model.std, frame=frame)


def _failure_message(path: Path, status: str, detail: str) -> str:
    if status == NO_AUDIO:
        return f"{path} has no audio stream: EquiAV embeds clips with both sound and picture; skipped"
    if status == NO_VIDEO:
        return f"{path} has no video stream: EquiAV embeds clips with both sound and picture; skipped"
    return f"{path}: {status}: {detail}"


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------------------------
# Embedding
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbedOptions:
    """How :func:`embed_files` embeds (the model's loading options are
    :func:`load_embedding_model`'s).

    seed, samples: the S = ``samples`` centroid parameter vectors, drawn from ``seed``.
    batch_size: clips per forward pass. offset, duration: the part of every file to embed, in
    seconds (default: all of it). workers: files decoded concurrently (each ffmpeg process uses
    about one core).
    """

    seed: int = 0
    samples: int = 16
    batch_size: int = 16
    offset: float = 0.0
    duration: float | None = None
    workers: int = 1

    def __post_init__(self) -> None:
        if self.samples < 1 or self.batch_size < 1 or self.workers < 1:
            raise ValueError(
                f"samples, batch_size and workers must be >= 1; got {self.samples}, {self.batch_size}, {self.workers}"
            )


@torch.inference_mode()
def embed_files(
    paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    model: str | os.PathLike[str] | EmbeddingModel,
    options: EmbedOptions = EmbedOptions(),
) -> Embeddings:
    """Audio and visual embeddings of video files (see the module docstring).

    Args:
        paths: files and/or folders (a folder contributes its video files, see
            :func:`collect_inputs`).
        model: a loaded :class:`EmbeddingModel`, or a weights file loaded with
            :func:`load_embedding_model`'s defaults (on the CPU, the file's own statistics).
        options: see :class:`EmbedOptions`.

    Returns:
        :class:`Embeddings` of the files that could be embedded, in input order; the others
        are in ``failures`` (each also logged as a warning).

    Raises:
        FileNotFoundError / ValueError: a missing input, a folder without videos, an unreadable
            or mismatched checkpoint, bad arguments.
    """
    seed, samples, offset, duration = options.seed, options.samples, options.offset, options.duration
    files = collect_inputs([paths] if isinstance(paths, (str, os.PathLike)) else paths)
    if not files:
        raise ValueError("no input file given")
    loaded = model if isinstance(model, EmbeddingModel) else load_embedding_model(model)
    config = loaded.config
    audio_params, visual_params = draw_centroid_params(
        1, samples, (config.audio_frames, config.audio_freq_bins), (config.image_size, config.image_size), seed
    )

    ids = _clip_ids(files)
    kept_ids: list[str] = []
    kept_paths: list[str] = []
    outputs: dict[str, list[Tensor]] = {name: [] for name in _ARRAYS}
    failures: list[tuple[str, str, str]] = []
    with ThreadPoolExecutor(options.workers) as pool:
        for batch in _batches(list(zip(ids, files, strict=True)), options.batch_size):
            decoded = list(pool.map(lambda item: _prepare(item[1], loaded, offset, duration), batch))
            good = []
            for (clip_id, path), item in zip(batch, decoded, strict=True):
                if item.fbank is None:
                    log.warning("%s", item.message)
                    failures.append((str(path), item.status, item.message))
                else:
                    good.append((clip_id, path, item))
            if not good:
                continue
            n = len(good)
            out = loaded.model.encode(
                audio=torch.stack([g[2].fbank for g in good]).to(loaded.device),
                visual=normalize_image(torch.stack([g[2].frame for g in good]).to(loaded.device)),
                audio_centroid_params=audio_params.expand(n, -1, -1).to(loaded.device),
                visual_centroid_params=visual_params.expand(n, -1, -1).to(loaded.device),
            )
            for name in _ARRAYS:
                outputs[name].append(out[name].float().cpu())
            kept_ids.extend(g[0] for g in good)
            kept_paths.extend(str(g[1]) for g in good)

    widths = {"audio_pooled": config.embed_dim, "visual_pooled": config.embed_dim}
    arrays = {
        name: (
            torch.cat(outputs[name]).numpy()
            if outputs[name]
            else np.zeros((0, widths.get(name, config.embed_out)), dtype=np.float32)
        )
        for name in _ARRAYS
    }
    info = {
        "checkpoint": loaded.checkpoint,
        "seed": seed,
        "samples": samples,
        "norm_mean": loaded.mean,
        "norm_std": loaded.std,
        "offset": offset,
        "duration": duration,
        "frame": f"{EVAL_FRAME} of {EVAL_NUM_FRAMES}",
        "model_config": config.to_dict(),
    }
    return Embeddings(kept_ids, kept_paths, **arrays, failures=failures, info=info)


def rank_clips(query: Embeddings, keys: Embeddings, *, direction: str = "a2v", row: int = 0) -> list[tuple[str, float]]:
    """Every clip of ``keys`` ranked by the cosine similarity of its inter-modal embedding to
    query clip ``row``'s: its audio against their pictures ("a2v") or the reverse ("v2a").
    Returns (clip id, similarity), most similar first (ties in input order)."""
    if not 0 <= row < len(query):
        raise IndexError(f"query row {row} out of range for {len(query)} embedded clip(s)")
    queries, candidates = _direction_arrays(query, keys, direction)
    scores = candidates @ queries[row]
    order = np.argsort(-scores, kind="stable")
    return [(keys.clip_ids[i], float(scores[i])) for i in order]

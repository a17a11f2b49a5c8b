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

import argparse
import json
import logging
import math
import os
import pickle
import sys
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

from equiav.augment import normalize_image
from equiav.data.features import FeatureSettings, fbank
from equiav.data.media import MediaError, decode_clip
from equiav.data.status import DECODE_ERROR, NO_AUDIO, NO_VIDEO, TOO_SHORT
from equiav.eval.retrieval import draw_centroid_params
from equiav.model import EquiAV, ModelConfig, convert_release_state_dict
from equiav.model.convert import RELEASE_PREFIX
from equiav.options import add_device, add_pretrained, add_workers, resolve_device
from equiav.train.checkpoint import load_weights

__all__ = [
    "AUDIOSET_MEAN",
    "AUDIOSET_STD",
    "EVAL_FRAME",
    "EVAL_NUM_FRAMES",
    "VIDEO_EXTENSIONS",
    "EmbeddingModel",
    "Embeddings",
    "add_embed_arguments",
    "add_retrieve_arguments",
    "collect_inputs",
    "embed_files",
    "load_embedding_model",
    "load_embeddings",
    "main",
    "main_embed",
    "main_retrieve",
    "rank_clips",
    "run_embed",
    "run_retrieve",
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
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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


def _read_checkpoint(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = load_weights(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(
            f"cannot read checkpoint {str(path)!r} as a PyTorch weights file (weights_only=True): {err}"
        ) from err
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a dict of weights")
    return state


def _looks_like_release(state: Mapping[str, Any]) -> bool:
    keys = state.get("model", state)
    return isinstance(keys, Mapping) and any(
        isinstance(k, str) and k.removeprefix("module.").startswith((RELEASE_PREFIX, "patch_embed_a", "blocks_a."))
        for k in keys
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
    state = _read_checkpoint(path)
    if release:
        if "model_config" in state:
            raise ValueError(
                f"{str(path)!r} is an equiav export (it has a model_config), not a release checkpoint; drop --release"
            )
        config = release_config or ModelConfig.vit_base()
        weights = state.get("model", state)
        if not isinstance(weights, Mapping):
            raise ValueError(f"{str(path)!r} holds no state dict (under 'model' or at the top level)")
        weights = convert_release_state_dict(weights)
        stored = None
    else:
        if "model_config" not in state or "model" not in state:
            hint = (
                "; it looks like the authors' release checkpoint: pass --release (release=True)"
                if _looks_like_release(state)
                else ""
            )
            raise ValueError(
                f"{str(path)!r} is not an equiav export (keys 'model' and 'model_config' expected, found "
                f"{sorted(map(str, state))[:8]}){hint}"
            )
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


@torch.inference_mode()
def embed_files(
    paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | EmbeddingModel,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    samples: int = 16,
    batch_size: int = 16,
    release: bool = False,
    mean: float | None = None,
    std: float | None = None,
    offset: float = 0.0,
    duration: float | None = None,
    workers: int = 1,
) -> Embeddings:
    """Audio and visual embeddings of video files (see the module docstring).

    Args:
        paths: files and/or folders (a folder contributes its video files, see
            :func:`collect_inputs`).
        checkpoint: a weights file (see :func:`load_embedding_model`) or an already loaded
            :class:`EmbeddingModel` (``device``, ``release``, ``mean`` and ``std`` are then ignored).
        seed, samples: the S = ``samples`` centroid parameter vectors, drawn from ``seed``.
        batch_size: clips per forward pass.
        offset, duration: the part of every file to embed, in seconds (default: all of it).
        workers: files decoded concurrently (each ffmpeg process uses about one core).

    Returns:
        :class:`Embeddings` of the files that could be embedded, in input order; the others
        are in ``failures`` (each also logged as a warning).

    Raises:
        FileNotFoundError / ValueError: a missing input, a folder without videos, an unreadable
            or mismatched checkpoint, bad arguments.
    """
    if samples < 1 or batch_size < 1 or workers < 1:
        raise ValueError(f"samples, batch_size and workers must be >= 1; got {samples}, {batch_size}, {workers}")
    files = collect_inputs([paths] if isinstance(paths, (str, os.PathLike)) else paths)
    if not files:
        raise ValueError("no input file given")
    loaded = (
        checkpoint
        if isinstance(checkpoint, EmbeddingModel)
        else load_embedding_model(checkpoint, release=release, mean=mean, std=std, device=device)
    )
    config = loaded.config
    audio_params, visual_params = draw_centroid_params(
        1, samples, (config.audio_frames, config.audio_freq_bins), (config.image_size, config.image_size), seed
    )

    ids = _clip_ids(files)
    kept_ids: list[str] = []
    kept_paths: list[str] = []
    outputs: dict[str, list[Tensor]] = {name: [] for name in _ARRAYS}
    failures: list[tuple[str, str, str]] = []
    with ThreadPoolExecutor(workers) as pool:
        for batch in _batches(list(zip(ids, files, strict=True)), batch_size):
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


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _model_arguments(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model")
    # --checkpoint: the name before the command tree shared --pretrained (kept for scripts, hidden).
    name = model.add_mutually_exclusive_group(required=True)
    add_pretrained(name, "model.pt of the pre-train stage (or a release file with --release)", required=False)
    name.add_argument("--checkpoint", dest="pretrained", help=argparse.SUPPRESS)
    model.add_argument("--release", action="store_true", help="the file is the authors' release (converted on load)")
    model.add_argument("--mean", type=float, help="fbank normalisation mean (default: the checkpoint's)")
    model.add_argument("--std", type=float, help="fbank normalisation std (default: the checkpoint's)")
    add_device(model)
    embedding = p.add_argument_group("embedding")
    embedding.add_argument("--seed", type=int, default=0, help="seed of the centroid parameter vectors")
    embedding.add_argument("--samples", type=int, default=16, help="parameter vectors per centroid (S)")
    embedding.add_argument("--batch-size", type=int, default=16, help="clips embedded per batch")
    add_workers(embedding, 1, "files decoded concurrently")
    embedding.add_argument("--offset", type=float, default=0.0, help="seconds skipped at the start of every file")
    embedding.add_argument("--duration", type=float, help="seconds embedded per file (default: to the end)")


def _load_from_args(args: argparse.Namespace) -> EmbeddingModel:
    return load_embedding_model(
        args.pretrained, release=args.release, mean=args.mean, std=args.std, device=resolve_device(args.device)
    )


def _embed_with_args(inputs: Sequence[str], model: EmbeddingModel, args: argparse.Namespace) -> Embeddings:
    return embed_files(
        inputs,
        model,
        seed=args.seed,
        samples=args.samples,
        batch_size=args.batch_size,
        offset=args.offset,
        duration=args.duration,
        workers=args.workers,
    )


def add_embed_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``equiav embed``."""
    p.add_argument("inputs", nargs="+", help="video files and/or folders (a folder: its video files)")
    p.add_argument("--out", required=True, help="the output file (.npz)")
    _model_arguments(p)


def add_retrieve_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``equiav retrieve``."""
    p.add_argument("--query", required=True, help="the query video file")
    p.add_argument("--folder", required=True, help="the folder of candidate clips")
    p.add_argument(
        "--direction", choices=DIRECTIONS, default="a2v", help="a2v: query sound vs clips' pictures; v2a: the reverse"
    )
    p.add_argument("--top", type=int, default=10, help="clips to print (0: all)")
    _model_arguments(p)


def _fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main_embed(argv: Sequence[str] | None = None) -> int:
    """``equiav embed ARGV``."""
    from equiav.cli import main as equiav_main

    return equiav_main(["embed", *(sys.argv[1:] if argv is None else argv)])


def run_embed(args: argparse.Namespace) -> int:
    """``equiav embed INPUTS... --pretrained PATH [--release] --out FILE``.

    Exit status: 0 when at least one clip was embedded (skipped files are listed on stderr and
    in the file's ``failed_*`` arrays), 1 when none could be, 2 for a usage error."""
    if not args.out.endswith(".npz"):
        return _fail(f"--out must name a .npz file, got {args.out!r}")
    try:
        model = _load_from_args(args)
        embeddings = _embed_with_args(args.inputs, model, args)
    except (FileNotFoundError, ValueError) as err:
        return _fail(str(err))
    out = save_embeddings(embeddings, args.out)
    n, d, e = len(embeddings), model.config.embed_dim, model.config.embed_out
    print(f"embedded {n} clip(s) with {model.checkpoint}: inter [{n}, {e}], pooled [{n}, {d}] per modality -> {out}")
    for path, status, _ in embeddings.failures:
        print(f"skipped {path}: {status}")
    if n == 0:
        return _fail("no clip could be embedded (see the messages above)", 1)
    return 0


def main_retrieve(argv: Sequence[str] | None = None) -> int:
    """``equiav retrieve ARGV``."""
    from equiav.cli import main as equiav_main

    return equiav_main(["retrieve", *(sys.argv[1:] if argv is None else argv)])


def run_retrieve(args: argparse.Namespace) -> int:
    """``equiav retrieve --query CLIP --folder DIR --pretrained PATH [--direction a2v|v2a]
    [--top K]``: prints rank, cosine similarity and clip id, most similar first."""
    if args.top < 0:
        return _fail(f"--top must be >= 0 (0: every clip), got {args.top}")
    if not Path(args.query).is_file():
        return _fail(f"query {args.query!r} is not a file")
    try:
        model = _load_from_args(args)
        query = _embed_with_args([args.query], model, args)
        if not len(query):
            _, status, message = query.failures[0]
            return _fail(f"the query cannot be embedded ({status}): {message}", 1)
        keys = _embed_with_args([args.folder], model, args)
    except (FileNotFoundError, ValueError) as err:
        return _fail(str(err))
    if not len(keys):
        return _fail(f"no clip of {args.folder} could be embedded (see the messages above)", 1)
    ranking = rank_clips(query, keys, direction=args.direction)
    shown = ranking[: args.top] if args.top else ranking
    query_side, key_side = ("audio", "picture") if args.direction == "a2v" else ("picture", "audio")
    print(f"{query_side} of {query.clip_ids[0]} vs the {key_side} of {len(keys)} clip(s) in {args.folder}:")
    print(f"{'rank':>4}  {'similarity':>10}  clip")
    for rank, (clip_id, score) in enumerate(shown, start=1):
        print(f"{rank:>4}  {score:>10.4f}  {clip_id}")
    for path, status, _ in keys.failures:
        print(f"skipped {path}: {status}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m equiav.embed {embed,retrieve} ...``: the same as ``equiav embed|retrieve ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("embed", "retrieve"):
        return _fail("usage: python -m equiav.embed {embed,retrieve} ... (--help after the command for its options)")
    from equiav.cli import main as equiav_main

    return equiav_main(argv)


if __name__ == "__main__":
    sys.exit(main())

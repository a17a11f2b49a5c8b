"""Zero-shot audio-visual retrieval (method.md section 8, pipeline stage 7).

Each clip's audio and middle frame are embedded with the pre-trained model's inter-modal
embedding (``EquiAV.encode``: the centroid of S = 16 predicted embeddings, from parameter
vectors drawn once from ``--seed``), L2-normalised, and compared by cosine similarity. A video
query's true key is the same clip's audio (V2A) and vice versa (A2V); ranks are pessimistic
(ties ranked worst, see equiav.metrics).

The clips: ``--per-class`` clips per class from ``--split``, chosen deterministically (below),
or the clip ids of a user list (``--ids``, e.g. MSR-VTT's test set). The ids used are written to
``--ids-out`` so that anyone can repeat the evaluation on exactly those clips. ``--matches-out``
lists each query's best keys (the report's retrieval examples are drawn from it).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from equiav.atomic import write_json
from equiav.augment import AudioAugment, VisualAugment, normalize_image
from equiav.data.inputs import DatasetInputs, fit_config_to_data
from equiav.metrics import RECALL_KS, chunked_similarity_ranks, rank_metrics
from equiav.model import EquiAV, ModelConfig
from equiav.options import (
    add_dataset_inputs,
    add_device,
    add_pretrained,
    add_workers,
    resolve_device,
)
from equiav.train.checkpoint import load_export, starting_point

__all__ = [
    "MATCH_COLUMNS",
    "add_arguments",
    "draw_centroid_params",
    "embed_clips",
    "read_id_list",
    "retrieval",
    "run",
    "select_per_class",
    "stable_key",
    "top_matches",
]

log = logging.getLogger(__name__)

# Queries per similarity matrix product: [4096, N] floats at a time.
SIMILARITY_CHUNK = 4096
# One row per (direction, query, match) of matches.csv; rank 1 is the best key.
MATCH_COLUMNS = ["direction", "query_id", "true_rank", "rank", "match_id", "similarity"]


def stable_key(clip_id: str, seed: int) -> int:
    """A 64-bit hash of (seed, clip id) that is the same on every machine and Python run
    (unlike ``hash()``): the order in which clips of a class are chosen."""
    digest = hashlib.blake2b(f"{seed}\0{clip_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def select_per_class(table: pd.DataFrame, classes: Sequence[str], *, per_class: int, seed: int) -> list[str]:
    """The deterministic retrieval subset of a split's clips.

    A clip counts for its first label in class order; within each class the clips are ordered
    by :func:`stable_key` (so the choice depends neither on file order nor on which other clips
    were downloaded) and the first ``per_class`` are taken (all when a class has fewer; every
    clip when ``per_class`` is 0). Unlabelled clips are left out unless ``per_class`` is 0.

    Args:
        table: rows with ``clip_id`` and ``labels`` (class ids joined by ';').
        classes: the class ids in class order.

    Returns:
        clip ids ordered by class, then by key (by clip id when ``per_class`` is 0).
    """
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0 (0 = every clip), got {per_class}")
    if per_class == 0:
        return sorted(table["clip_id"])
    position = {name: k for k, name in enumerate(classes)}
    chosen: dict[int, list[tuple[int, str]]] = {}
    unlabelled = 0
    for clip_id, labels in zip(table["clip_id"], table["labels"], strict=True):
        names = [name for name in str(labels).split(";") if name]
        unknown = [name for name in names if name not in position]
        if unknown:
            raise ValueError(
                f"clip {clip_id!r} has label {unknown[0]!r}, not in the class list; pass the data set's classes.csv"
            )
        if not names:
            unlabelled += 1
            continue
        chosen.setdefault(min(position[name] for name in names), []).append((stable_key(clip_id, seed), clip_id))
    if unlabelled:
        log.info("%d unlabelled clips are not eligible for the per-class subset", unlabelled)
    return [clip_id for c in sorted(chosen) for _, clip_id in sorted(chosen[c])[:per_class]]


def read_id_list(path: str | Path) -> list[str]:
    """Clip ids, one per line; blank lines and lines starting with '#' are skipped."""
    ids = [line.strip() for line in Path(path).read_text().splitlines()]
    ids = [i for i in ids if i and not i.startswith("#")]
    seen: set[str] = set()
    repeated = sorted({i for i in ids if i in seen or seen.add(i)})
    if repeated:
        raise ValueError(
            f"{path} lists {len(repeated)} clip id(s) more than once, e.g. {repeated[:3]}; each clip must appear once"
        )
    if not ids:
        raise ValueError(f"{path} lists no clip id")
    return ids


def draw_centroid_params(
    clips: int, samples: int, audio_shape: tuple[int, int], image_shape: tuple[int, int], seed: int
) -> tuple[Tensor, Tensor]:
    """The S parameter vectors of every clip's centroid, from one generator seeded once.

    Each clip gets its own S vectors (row i for the i-th clip of the subset), drawn for all
    clips in one call, so they depend on the seed and the clip's position only, not on the
    batch size or the device. Audio vectors first, then visual.

    Returns:
        audio float32 [clips, S, 24], visual float32 [clips, S, 18].
    """
    generator = torch.Generator().manual_seed(seed)
    audio = AudioAugment().sample_params(clips, samples, *audio_shape, generator=generator)
    visual = VisualAugment().sample_params(clips, samples, *image_shape, generator=generator)
    return audio, visual


@torch.inference_mode()
def embed_clips(
    model: EquiAV,
    loader: DataLoader,
    audio_params: Tensor,
    visual_params: Tensor,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """L2-normalised inter-modal embeddings of every clip of ``loader`` (in its order).

    Args:
        loader: batches of FeatureDataset items (``fbank`` [B, T, F], ``frames`` uint8 [B, 3, H, W]),
            not shuffled: row i of the params belongs to the i-th clip it yields.
        audio_params, visual_params: [N, S, 24] and [N, S, 18] centroid vectors.

    Returns:
        audio [N, E], visual [N, E] float32 on ``device``.
    """
    model.eval()
    audio_out, visual_out = [], []
    offset = 0
    for batch in loader:
        n = batch["fbank"].shape[0]
        out = model.encode(
            audio=batch["fbank"].to(device),
            visual=normalize_image(batch["frames"].to(device)),
            audio_centroid_params=audio_params[offset : offset + n].to(device),
            visual_centroid_params=visual_params[offset : offset + n].to(device),
        )
        audio_out.append(F.normalize(out["audio_inter"].float(), dim=-1))
        visual_out.append(F.normalize(out["visual_inter"].float(), dim=-1))
        offset += n
    if offset != audio_params.shape[0]:
        raise RuntimeError(f"the loader gave {offset} clips but {audio_params.shape[0]} centroid rows were drawn")
    return torch.cat(audio_out), torch.cat(visual_out)


def _direction_metrics(queries: Tensor, keys: Tensor) -> dict[str, float]:
    return rank_metrics(chunked_similarity_ranks(queries, keys, chunk=SIMILARITY_CHUNK))


def top_matches(direction: str, queries: Tensor, keys: Tensor, ids: Sequence[str], k: int) -> pd.DataFrame:
    """The ``k`` most similar keys of every query (MATCH_COLUMNS), query i's true key being key i.

    ``queries`` and ``keys`` are L2-normalised [N, E] in the order of ``ids``; ``true_rank`` is the
    query's pessimistic rank of its true key, as in the metrics.
    """
    k = min(k, keys.shape[0])
    true_ranks = chunked_similarity_ranks(queries, keys, chunk=SIMILARITY_CHUNK).tolist()
    frames = []
    for start in range(0, queries.shape[0], SIMILARITY_CHUNK):
        scores, best = (queries[start : start + SIMILARITY_CHUNK] @ keys.T).topk(k, dim=1)
        n = best.shape[0]
        frames.append(
            pd.DataFrame(
                {
                    "direction": direction,
                    "query_id": [ids[start + q] for q in range(n) for _ in range(k)],
                    "true_rank": [true_ranks[start + q] for q in range(n) for _ in range(k)],
                    "rank": list(range(1, k + 1)) * n,
                    "match_id": [ids[j] for j in best.flatten().tolist()],
                    "similarity": scores.flatten().tolist(),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)[MATCH_COLUMNS]


def _choose_clips(
    inputs: DatasetInputs, *, split: str | None, ids_file: str | None, per_class: int, seed: int
) -> tuple[list[str], int]:
    """(the clip ids to use, how many listed ids are not usable)."""
    table = inputs.usable if split is None else inputs.usable[inputs.usable["split"] == split]
    if ids_file is None:
        if table.empty:
            raise ValueError(
                f"no usable clip in split {split!r}; the usable clips are in {sorted(set(inputs.usable['split']))}"
            )
        return select_per_class(table, inputs.classes, per_class=per_class, seed=seed), 0
    wanted = read_id_list(ids_file)
    available = set(table["clip_id"])
    ids = [i for i in wanted if i in available]
    missing = len(wanted) - len(ids)
    if missing:
        where = f"split {split!r}" if split else "the usable clips"
        log.warning(
            "%d of the %d ids in %s are not in %s (not obtained); they are left out",
            missing,
            len(wanted),
            ids_file,
            where,
        )
    if not ids:
        raise ValueError(
            f"none of the ids in {ids_file} is among {len(available)} usable clips; "
            "do the ids match the manifest's clip_id?"
        )
    return ids, missing


def retrieval(
    pretrained: str | Path,
    inputs: DatasetInputs,
    *,
    split: str | None,
    ids_file: str | None = None,
    per_class: int = 5,
    seed: int = 0,
    samples: int = 16,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | None = None,
    matches_per_query: int = 5,
) -> tuple[dict[str, Any], list[str], pd.DataFrame]:
    """Zero-shot V2A and A2V retrieval of a pre-trained model.

    Returns (metrics, clip ids used, the ``matches_per_query`` best keys of every query).
    """
    if samples < 1 or batch_size < 1:
        raise ValueError(f"samples and batch_size must be >= 1, got {samples} and {batch_size}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ids, missing = _choose_clips(inputs, split=split, ids_file=ids_file, per_class=per_class, seed=seed)
    if len(ids) < 2:
        raise ValueError(f"retrieval needs at least 2 clips, the subset has {len(ids)}")

    dataset = inputs.dataset(None if split is None else [split], frame="middle", clip_ids=ids)
    position = {clip_id: k for k, clip_id in enumerate(dataset.index["clip_id"])}
    ordered = Subset(dataset, [position[clip_id] for clip_id in ids])  # the published id order
    attrs = dataset.shard_attrs

    weights = load_export(pretrained)
    config = fit_config_to_data(ModelConfig.from_dict(weights["model_config"]), attrs, audio=True, visual=True)
    model = EquiAV(config)
    model.load_state_dict(weights["model"])
    model.to(device)
    log.info(
        "embedding %d clips (%s) with %s: %d centroid samples, seed %d, on %s",
        len(ids), f"split {split}" if split else "every split", pretrained, samples, seed, device,
    )  # fmt: skip

    audio_params, visual_params = draw_centroid_params(
        len(ids),
        samples,
        (attrs["target_frames"], attrs["num_mel_bins"]),
        (attrs["frame_size"], attrs["frame_size"]),
        seed,
    )
    loader = DataLoader(
        ordered, batch_size=batch_size, shuffle=False, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    audio, visual = embed_clips(model, loader, audio_params, visual_params, device)

    n = len(ids)
    metrics: dict[str, Any] = {
        "task": "retrieval",
        "split": split,
        "clips": n,
        "per_class": None if ids_file else per_class,
        "ids_missing": missing,
        "seed": seed,
        "samples": samples,
        **{f"chance_r{k}": min(1.0, k / n) for k in RECALL_KS},
        "chance_median_rank": (n + 1) / 2,
        "v2a": _direction_metrics(visual, audio),
        "a2v": _direction_metrics(audio, visual),
        "pretrained": str(pretrained),
        "start": starting_point(weights, pretrained),
    }
    matches = pd.concat(
        [
            top_matches("v2a", visual, audio, ids, matches_per_query),
            top_matches("a2v", audio, visual, ids, matches_per_query),
        ],
        ignore_index=True,
    )
    return metrics, ids, matches


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``equiav retrieval``."""
    add_pretrained(p)
    add_dataset_inputs(p)
    clips = p.add_argument_group("clips")
    clips.add_argument(
        "--split", help="the split the clips come from (required without --ids; with --ids it restricts them)"
    )
    clips.add_argument("--per-class", type=int, default=5, help="clips per class (0: every clip of the split)")
    clips.add_argument("--ids", help="a file of clip ids (one per line) to use instead of the per-class subset")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset choice and of the centroid vectors")
    p.add_argument("--samples", type=int, default=16, help="parameter vectors per centroid (S)")
    p.add_argument("--batch-size", type=int, default=64, help="clips embedded per batch")
    add_workers(p, 0, "DataLoader worker processes (0: load in the main process)")
    add_device(p)
    out = p.add_argument_group("outputs")
    out.add_argument("--out", required=True, help="where metrics.json goes")
    out.add_argument("--ids-out", required=True, help="where the clip ids used go, one per line")
    out.add_argument(
        "--matches-out",
        help=f"where each query's best keys go (CSV: {', '.join(MATCH_COLUMNS)}; default: not written)",
    )
    out.add_argument("--matches-per-query", type=int, default=5, help="keys listed per query in --matches-out")


def run(args: argparse.Namespace) -> int:
    """The body of ``equiav retrieval`` (logging is set up by equiav.cli)."""
    if args.ids is None and args.split is None:
        raise SystemExit("give --split (the per-class subset is drawn from it) or --ids (a list of clip ids)")
    inputs = DatasetInputs.load(args.usable, args.classes, args.norm_stats)
    metrics, ids, matches = retrieval(
        args.pretrained,
        inputs,
        split=args.split,
        ids_file=args.ids,
        per_class=args.per_class,
        seed=args.seed,
        samples=args.samples,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=resolve_device(args.device),
        matches_per_query=args.matches_per_query,
    )
    if args.matches_out:
        Path(args.matches_out).parent.mkdir(parents=True, exist_ok=True)
        matches.to_csv(args.matches_out, index=False)
    ids_out, out = Path(args.ids_out), Path(args.out)
    ids_out.parent.mkdir(parents=True, exist_ok=True)
    ids_out.write_text("\n".join(ids) + "\n")
    metrics["subset_ids_file"] = str(ids_out)
    write_json(out, metrics)
    log.info(
        "%d clips: V2A R@1/5/10 %.3f/%.3f/%.3f, A2V %.3f/%.3f/%.3f (chance R@5 %.3f)",
        metrics["clips"], *(metrics["v2a"][f"R@{k}"] for k in RECALL_KS),
        *(metrics["a2v"][f"R@{k}"] for k in RECALL_KS), metrics["chance_r5"],
    )  # fmt: skip
    return 0

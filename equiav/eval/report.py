"""What ``snakemake --report`` shows besides the rule graph (pipeline stage 8, docs/report.md).

* ``page``: one of the pipeline's Markdown pages (a table of ``equiav tables``, an availability
  report) as a stand-alone HTML page, since the report displays HTML but not Markdown;
* ``curves``: a pre-training run's losses, accuracies and learning rate against the step
  (its ``metrics.csv``);
* ``finetune-curves``: the evaluation metric of every fine-tuning run after each epoch;
* ``retrieval-examples``: a few queries of a retrieval run (frame and spectrogram) beside their
  best matches, the true pair framed in green (from the run's ``matches.csv``);
* ``qualitative``: the paper's Figure 3: for a few clips, of many random visual augmentations,
  the one whose equivariant feature u(h, t) is nearest (cosine) the centroid of all of them,
  shown as the transformed frame beside the original and the farthest one.

Every command writes one file; the pictures are PNG drawn with matplotlib's Agg backend.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import markdown
import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from equiav.augment import IMAGENET_MEAN, IMAGENET_STD, VisualAugment, VisualAugmentConfig, normalize_image
from equiav.data.inputs import DatasetInputs, fit_config_to_data
from equiav.eval.retrieval import MATCH_COLUMNS, read_id_list
from equiav.model import EquiAV, ModelConfig
from equiav.options import HelpFormatter, add_dataset_inputs, add_device, add_pretrained, resolve_device
from equiav.train.checkpoint import load_export

__all__ = [
    "markdown_page",
    "nearest_to_centroid",
    "plot_finetune_curves",
    "plot_pretrain_curves",
    "plot_qualitative",
    "plot_retrieval_examples",
    "spread",
    "add_arguments",
    "run",
]

log = logging.getLogger(__name__)

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; max-width: 75em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #bbb; padding: 0.2em 0.6em; text-align: left; }}
th {{ background: #eee; }}
code {{ background: #f4f4f4; }}
</style></head>
<body>
{body}
</body></html>
"""
LOSS_COLUMNS = ("loss", "inter", "intra_audio", "intra_visual")
ACCURACY_COLUMNS = ("acc_inter", "acc_intra_audio", "acc_intra_visual")
TRUE_PAIR = "#2ca02c"


def markdown_page(text: str, title: str) -> str:
    """A Markdown page of the pipeline (pipe tables, lists, links) as a stand-alone HTML page."""
    body = markdown.markdown(text, extensions=["tables"])
    return _PAGE.format(title=html.escape(title), body=body)


# --------------------------------------------------------------------------------------------
# Training curves
# --------------------------------------------------------------------------------------------


def plot_pretrain_curves(history: pd.DataFrame, title: str, out: str | Path) -> None:
    """Losses, contrastive accuracies and learning rate against the step (pre-training metrics.csv)."""
    missing = {"step", "lr", *LOSS_COLUMNS, *ACCURACY_COLUMNS} - set(history.columns)
    if missing:
        raise ValueError(
            f"the pre-training metrics lack columns {sorted(missing)}; is this a pre-training metrics.csv?"
        )
    if history.empty:
        raise ValueError("the pre-training metrics have no row: the run logged no step")
    # A resumed run re-logs the steps after its checkpoint: keep the last value of each step.
    history = history.drop_duplicates("step", keep="last").sort_values("step")
    step = history["step"] + 1
    fig, (losses, accuracies, lr) = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    for column in LOSS_COLUMNS:
        losses.plot(step, history[column], label=column, linewidth=2 if column == "loss" else 1)
    losses.set(title="losses", xlabel="step", ylabel="InfoNCE (sum for 'loss')")
    losses.legend()
    for column in ACCURACY_COLUMNS:
        accuracies.plot(step, history[column], label=column.removeprefix("acc_"))
    accuracies.set(title="contrastive top-1 accuracy in the batch", xlabel="step", ylim=(0, 1))
    accuracies.legend()
    lr.plot(step, history["lr"], color="black")
    lr.set(title="learning rate", xlabel="step")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    fig.suptitle(title)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_finetune_curves(runs: dict[str, dict], out: str | Path) -> None:
    """The evaluation metric after each epoch of every fine-tuning run (their metrics.json)."""
    if not runs:
        raise ValueError("no fine-tuning metrics given")
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    metrics = set()
    for name, metrics_json in sorted(runs.items()):
        history = metrics_json.get("history") or []
        if not history:
            log.warning("fine-tuning run %s has no per-epoch history; it is left out of the figure", name)
            continue
        epochs = [row["epoch"] for row in history]
        ax.plot(epochs, [row["value"] for row in history], marker="o", label=f"{name} ({metrics_json['modality']})")
        metrics.add(metrics_json["metric"])
    ax.set(title="fine-tuning: evaluation after each epoch", xlabel="epoch", ylabel=" / ".join(sorted(metrics)))
    ax.legend(fontsize="small")
    fig.savefig(out, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Retrieval examples
# --------------------------------------------------------------------------------------------


def spread(items: Sequence[str], count: int) -> list[str]:
    """``count`` items spread evenly over ``items`` (first and last included), in order."""
    positions = np.linspace(0, len(items) - 1, min(count, len(items))).round().astype(int)
    return [items[p] for p in dict.fromkeys(positions.tolist())]


def _clip_inputs(inputs: DatasetInputs, clip_ids: Sequence[str]) -> tuple[dict[str, dict], dict]:
    """({clip id: {"fbank": [T, F] normalised, "frame": uint8 [3, H, W] or None, "label": class
    names}} in the order of ``clip_ids``, the shards' attributes)."""
    wanted = list(dict.fromkeys(clip_ids))
    dataset = inputs.dataset(None, frame="middle", clip_ids=wanted)
    found = {}
    for k in range(len(dataset)):
        item = dataset[k]
        names = [inputs.classes[c] for c in torch.nonzero(item["label"]).flatten().tolist()]
        found[item["clip_id"]] = {"fbank": item["fbank"], "frame": item.get("frames"), "label": ", ".join(names)}
    missing = [c for c in wanted if c not in found]
    if missing:
        raise ValueError(f"{len(missing)} clip(s) are not among the usable clips, e.g. {missing[:3]}")
    return {c: found[c] for c in wanted}, dataset.shard_attrs


def _show_frame(ax: plt.Axes, frame: Tensor | None) -> None:
    if frame is None:
        ax.text(0.5, 0.5, "no video", ha="center", va="center")
    else:
        ax.imshow(frame.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def _show_spectrogram(ax: plt.Axes, fbank: Tensor) -> None:
    ax.imshow(fbank.T.numpy(), origin="lower", aspect="auto", cmap="magma")
    ax.set_xticks([])
    ax.set_yticks([])


def _frame_axes(axes: Sequence[plt.Axes], colour: str) -> None:
    for ax in axes:
        for spine in ax.spines.values():
            spine.set(edgecolor=colour, linewidth=4)


def pick_queries(matches: pd.DataFrame, direction: str, count: int) -> list[str]:
    """``count`` query ids of ``direction`` spread evenly over the run's clip order."""
    queries = list(dict.fromkeys(matches.loc[matches["direction"] == direction, "query_id"]))
    if not queries:
        raise ValueError(f"matches.csv has no {direction} query")
    return spread(queries, count)


def plot_retrieval_examples(
    matches: pd.DataFrame, inputs: DatasetInputs, direction: str, out: str | Path, *, queries: int, top: int
) -> None:
    """Queries (frame above spectrogram) beside their ``top`` best matches; the true pair in green."""
    if list(matches.columns) != MATCH_COLUMNS:
        raise ValueError(f"matches must have columns {MATCH_COLUMNS} (equiav retrieval --matches-out)")
    chosen = pick_queries(matches, direction, queries)
    rows = matches[(matches["direction"] == direction) & matches["query_id"].isin(chosen) & (matches["rank"] <= top)]
    clips, _ = _clip_inputs(inputs, chosen + rows["match_id"].tolist())
    top = int(rows["rank"].max())
    query_kind, key_kind = ("video", "audio") if direction == "v2a" else ("audio", "video")
    fig, axes = plt.subplots(
        2 * len(chosen), 1 + top, figsize=(2.6 * (1 + top), 2.6 * len(chosen)), squeeze=False, constrained_layout=True
    )
    for q, query in enumerate(chosen):
        frame_ax, spec_ax = axes[2 * q, 0], axes[2 * q + 1, 0]
        _show_frame(frame_ax, clips[query]["frame"])
        _show_spectrogram(spec_ax, clips[query]["fbank"])
        true_rank = int(rows.loc[rows["query_id"] == query, "true_rank"].iloc[0])
        frame_ax.set_title(f"{query_kind} query {query}\n{clips[query]['label']}\ntrue pair at rank {true_rank}",
                           fontsize=8)  # fmt: skip
        for _, match in rows[rows["query_id"] == query].iterrows():
            column = int(match["rank"])
            pair = axes[2 * q, column], axes[2 * q + 1, column]
            _show_frame(pair[0], clips[match["match_id"]]["frame"])
            _show_spectrogram(pair[1], clips[match["match_id"]]["fbank"])
            pair[0].set_title(
                f"{key_kind} #{column}: {match['match_id']}\n{clips[match['match_id']]['label']}\n"
                f"cosine {match['similarity']:.3f}",
                fontsize=8,
            )
            if match["match_id"] == query:
                _frame_axes(pair, TRUE_PAIR)
    arrow = "video → audio" if direction == "v2a" else "audio → video"
    fig.suptitle(f"zero-shot retrieval, {arrow}: each query beside its {top} best matches (true pair framed)")
    fig.savefig(out, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The qualitative figure
# --------------------------------------------------------------------------------------------


def _unnormalise(images: Tensor) -> Tensor:
    """ImageNet-normalised [..., 3, H, W] -> uint8 RGB."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((images.float().cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)


def _candidate_generator(seed: int, candidate: int) -> torch.Generator:
    """Each candidate augmentation has its own generator, so that one can be re-drawn alone."""
    return torch.Generator().manual_seed(seed * 1_000_003 + candidate)


@torch.inference_mode()
def nearest_to_centroid(
    model: EquiAV, frame: Tensor, *, candidates: int, seed: int, chunk: int = 256, device: torch.device
) -> dict[str, object]:
    """Of ``candidates`` random augmentations of ``frame`` (uint8 [3, H, W]), the nearest and the
    farthest (cosine, in the D-dimensional feature space) equivariant feature u(h, t_i) to their
    centroid, the mean of all u(h, t_i) (what the predictor returns for all the vectors at once).

    Only the parameter vectors are drawn for every candidate; the two frames shown are then
    augmented from the same draws.

    Returns {"nearest", "farthest": uint8 [3, H, W] transformed frames; "nearest_cosine",
    "farthest_cosine": float}.
    """
    if model.visual_predictor is None:
        raise ValueError("this model has no transformation predictor (intra='invariant' with a clean or augmented "
                         "inter embedding): it has no equivariant features to compare")  # fmt: skip
    height, width = frame.shape[-2:]
    augment = VisualAugment(VisualAugmentConfig(size=height))
    params = torch.cat(
        [
            augment.sample_params(1, 1, height, width, generator=_candidate_generator(seed, i))[0]
            for i in range(candidates)
        ]
    ).to(device)
    tokens = model.visual_encoder(normalize_image(frame[None].to(device)))
    features = torch.cat(
        [
            model.visual_predictor(tokens.expand(len(part), -1, -1), part[:, None]).float()
            for part in params.split(chunk)
        ]
    )
    cosine = F.cosine_similarity(features, features.mean(dim=0, keepdim=True), dim=1).cpu()
    out: dict[str, object] = {"nearest_cosine": float(cosine.max()), "farthest_cosine": float(cosine.min())}
    for name, index in (("nearest", int(cosine.argmax())), ("farthest", int(cosine.argmin()))):
        image, _ = augment(frame[None], generator=_candidate_generator(seed, index))
        out[name] = _unnormalise(image[0])
    return out


def plot_qualitative(
    pretrained: str | Path,
    inputs: DatasetInputs,
    clip_ids: Sequence[str],
    out: str | Path,
    *,
    candidates: int,
    seed: int,
    device: torch.device,
) -> None:
    """For each clip: original frame, the augmentation nearest the centroid, the farthest one."""
    clips, attrs = _clip_inputs(inputs, clip_ids)
    weights = load_export(pretrained)
    config = fit_config_to_data(ModelConfig.from_dict(weights["model_config"]), attrs, audio=False, visual=True)
    model = EquiAV(config)
    model.load_state_dict(weights["model"])
    model.to(device).eval()
    fig, axes = plt.subplots(len(clips), 3, figsize=(9, 3.2 * len(clips)), squeeze=False, constrained_layout=True)
    for row, (clip_id, clip) in zip(axes, clips.items()):
        chosen = nearest_to_centroid(model, clip["frame"], candidates=candidates, seed=seed, device=device)
        for ax, image, title in (
            (row[0], clip["frame"], f"{clip_id}\n{clip['label']}\noriginal"),
            (row[1], chosen["nearest"], f"nearest the centroid\ncosine {chosen['nearest_cosine']:.3f}"),
            (row[2], chosen["farthest"], f"farthest\ncosine {chosen['farthest_cosine']:.3f}"),
        ):
            _show_frame(ax, image)
            ax.set_title(title, fontsize=8)
        _frame_axes([row[1]], TRUE_PAIR)
    fig.suptitle(f"the augmentation nearest the centroid of {candidates} (paper, Figure 3)", fontsize=10)
    fig.savefig(out, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``equiav report WHAT``: one sub-command per kind of page or picture."""
    sub = parser.add_subparsers(
        dest="what", required=True, metavar="WHAT", help="what to draw (`equiav report WHAT --help` for its options)"
    )

    def kind(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)

    p = kind("page", "a Markdown page as HTML")
    p.add_argument("--markdown", required=True, help="the Markdown page (a table or an availability report)")
    p.add_argument("--title", required=True, help="the HTML page's title")
    p.add_argument("--out", required=True, help="where the HTML page goes")
    p = kind("curves", "a pre-training run's loss and learning-rate curves")
    p.add_argument("--history", required=True, help="the run's metrics.csv")
    p.add_argument("--title", required=True, help="the figure's title")
    p.add_argument("--out", required=True, help="where the picture goes (PNG)")
    p = kind("finetune-curves", "every fine-tuning run's evaluation after each epoch")
    p.add_argument("--metrics", nargs="+", required=True, help="metrics.json files, in results/finetune/<run>/")
    p.add_argument("--out", required=True, help="where the picture goes (PNG)")
    p = kind("retrieval-examples", "queries beside their best matches")
    p.add_argument("--matches", required=True, help="matches.csv of equiav retrieval")
    add_dataset_inputs(p)
    p.add_argument(
        "--direction", choices=("v2a", "a2v"), required=True, help="v2a: picture queries; a2v: sound queries"
    )
    p.add_argument("--queries", type=int, default=4, help="queries shown (one row each)")
    p.add_argument("--top", type=int, default=3, help="best matches shown per query")
    p.add_argument("--out", required=True, help="where the picture goes (PNG)")
    p = kind("qualitative", "the augmentation nearest the centroid (paper, Figure 3)")
    add_pretrained(p)
    p.add_argument("--ids", required=True, help="the retrieval run's ids.txt; the clips are spread over it")
    add_dataset_inputs(p)
    p.add_argument("--clips", type=int, default=3, help="clips shown (one row each)")
    p.add_argument("--candidates", type=int, default=1000, help="random augmentations per clip (the paper: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the augmentations")
    add_device(p)
    p.add_argument("--out", required=True, help="where the picture goes (PNG)")


def run(args: argparse.Namespace) -> int:
    """The body of ``equiav report`` (logging is set up by equiav.cli)."""
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.what == "page":
        Path(args.out).write_text(markdown_page(Path(args.markdown).read_text(), args.title))
    elif args.what == "curves":
        plot_pretrain_curves(pd.read_csv(args.history), args.title, args.out)
    elif args.what == "finetune-curves":
        runs = {Path(path).parent.name: json.loads(Path(path).read_text()) for path in args.metrics}
        plot_finetune_curves(runs, args.out)
    else:
        inputs = DatasetInputs.load(args.usable, args.classes, args.norm_stats)
        if args.what == "retrieval-examples":
            matches = pd.read_csv(args.matches, dtype={"query_id": str, "match_id": str})
            plot_retrieval_examples(matches, inputs, args.direction, args.out, queries=args.queries, top=args.top)
        else:
            ids = spread(read_id_list(args.ids), args.clips)
            device = resolve_device(args.device)
            plot_qualitative(args.pretrained, inputs, ids, args.out, candidates=args.candidates, seed=args.seed,
                             device=device)  # fmt: skip
    log.info("report %s: wrote %s", args.what, args.out)
    return 0

"""``equiav embed`` and ``equiav retrieve``: their options and bodies, over the API of
:mod:`equiav.embed` (docs/embedding.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from equiav.embed import (
    DIRECTIONS,
    EmbeddingModel,
    Embeddings,
    EmbedOptions,
    embed_files,
    load_embedding_model,
    rank_clips,
    save_embeddings,
)
from equiav.options import add_device, add_pretrained, add_workers, read_settings, resolve_device
from equiav.settings.pretrain import model_config_of

__all__ = ["add_embed_arguments", "add_retrieve_arguments", "run_embed", "run_retrieve"]


def _model_arguments(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model")
    # --checkpoint: the name before the command tree shared --pretrained (kept for scripts, hidden).
    name = model.add_mutually_exclusive_group(required=True)
    add_pretrained(name, "model.pt of the pre-train stage (or a release file with --release)", required=False)
    name.add_argument("--checkpoint", dest="pretrained", help=argparse.SUPPRESS)
    model.add_argument("--release", action="store_true", help="the file is the authors' release (converted on load)")
    model.add_argument(
        "--model",
        type=read_settings,
        metavar="JSON",
        help="with --release: the model's size as a pretrain entry's `model` (default: preset vit_base)",
    )
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
    if args.model is not None and not args.release:
        raise ValueError("--model is for a release file (--release); an equiav model.pt carries its own size")
    return load_embedding_model(
        args.pretrained,
        release=args.release,
        mean=args.mean,
        std=args.std,
        device=resolve_device(args.device),
        release_config=model_config_of(args.model) if args.model is not None else None,
    )


def _embed_with_args(inputs: Sequence[str], model: EmbeddingModel, args: argparse.Namespace) -> Embeddings:
    options = EmbedOptions(args.seed, args.samples, args.batch_size, args.offset, args.duration, args.workers)
    return embed_files(inputs, model, options)


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

"""Data sets read from local copies: ESC-50, Speech Commands, and a user's own list."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from equiav.data.lists.classes import (
    _class_table,
    classes_from_labels,
)
from equiav.data.lists.rows import (
    _USER_COLUMNS,
    ListError,
    ParsedList,
    _Builder,
    _check_split,
    _labels,
    _number,
    _PathLike,
    _rows,
    _safe_id,
    _span,
    check_clip_id,
)


def read_esc50(csv_path: _PathLike, audio_dir: _PathLike) -> tuple[ParsedList, pd.DataFrame]:
    """ESC-50's ``esc50.csv`` (or a data set laid out like it): split ``fold<N>``, classes from target/category.

    The clip id is the file name without its suffix, each character outside A-Z a-z 0-9
    _ . - and a leading '.' replaced by '_' (``.hidden.wav`` -> ``_hidden``, ``...wav`` ->
    ``_.``); a name whose id would be longer than :data:`MAX_CLIP_ID_LENGTH` is a problem
    row. Two names that give one id are left to :func:`combine_lists` to report.

    Rows whose audio file is missing are kept (the download stage reports them); a list of
    which no file exists under ``audio_dir`` raises :class:`ListError`.
    """
    csv_path, audio_dir = Path(csv_path), Path(audio_dir)
    file = str(csv_path)
    b = _Builder(file)
    header: dict[str, int] | None = None
    need = ("filename", "fold", "target", "category")
    class_of_target: dict[int, str] = {}
    width = 0
    found_audio = False

    def bad_line(line: int, problem: str) -> None:
        if header is None:
            raise ListError(f"{file}: line {line}: cannot read the header: {problem}")
        b.unreadable(line, problem)

    for line, row in _rows(csv_path, bad_line):
        if header is None:
            names = [x.strip() for x in row]
            header = {name: i for i, name in enumerate(names)}
            absent = [name for name in need if name not in header]
            if absent:
                raise ListError(
                    f"{file}: line {line}: header lacks {', '.join(absent)} (found {','.join(names)!r}); "
                    "an ESC-50 list starts with 'filename,fold,target,category,...'"
                )
            width = len(names)
            continue
        b.rows_read += 1
        if len(row) != width:
            b.problem(line, f"expected {width} fields like the header, found {len(row)}")
            continue
        filename, fold_text, target_text, category = (row[header[name]].strip() for name in need)
        fold, target = _number(fold_text), _number(target_text)
        if not filename:
            b.problem(line, "empty source: no filename")
            continue
        if fold is None or not fold.is_integer():
            b.problem(line, f"bad fold {fold_text!r}: not an integer")
            continue
        if target is None or not target.is_integer() or target < 0:
            b.problem(line, f"bad target {target_text!r}: not an integer >= 0")
            continue
        if not category:
            b.problem(line, "empty labels: no category")
            continue
        if class_of_target.setdefault(int(target), category) != category:
            raise ListError(
                f"{file}: line {line}: target {int(target)} is {category!r} here but "
                f"{class_of_target[int(target)]!r} earlier; each target must name one category"
            )
        clip_id = _safe_id(Path(filename).stem)
        problem = check_clip_id(clip_id)
        if problem is not None:
            b.problem(line, f"filename {filename!r} gives no usable clip id: {problem}; rename the file")
            continue
        audio = audio_dir / filename
        # A missing file keeps its row: the download stage reports it as unavailable, like
        # any other clip whose media cannot be had. Only "none at all" is a config mistake.
        found_audio = found_audio or audio.is_file()
        b.add(line, clip_id, str(audio), 0.0, math.nan, category, f"fold{int(fold)}")
    sources = b.columns["source"]
    if sources and not found_audio:
        raise ListError(
            f"{audio_dir} holds none of the {len(sources)} files that {file} lists (first: {sources[0]}); "
            "set `audio_dir` to the folder of the audio files"
        )
    targets = sorted(class_of_target)
    categories = [class_of_target[t] for t in targets]
    return b.result(), _class_table(targets, categories, categories, file)


def _read_name_list(path: Path) -> dict[str, int]:
    """The entries of a Speech Commands split file (``word/file.wav`` per line) with their line numbers."""
    if not path.is_file():
        raise ListError(
            f"{path}: missing; Speech Commands ships validation_list.txt and testing_list.txt at the "
            "top of its archive: point the list's `path` at that folder"
        )
    entries: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            entry = text.strip().replace("\\", "/")
            if entry and not entry.startswith("#"):
                entries.setdefault(entry, line)
    return entries


def read_speech_commands(root: _PathLike) -> tuple[ParsedList, pd.DataFrame]:
    """Speech Commands (v0.01 layout): ``root/<word>/*.wav`` split by validation_list.txt and testing_list.txt.

    The clip id is ``<word>_<file name without .wav>``, made safe like ESC-50's (see
    :func:`read_esc50`); a file whose id would be too long is reported (line 0) and left out.
    """
    root = Path(root)
    if not root.is_dir():
        raise ListError(f"{root}: no such folder; point the list's `path` at the unpacked Speech Commands folder")
    lists = {
        split: (root / name, _read_name_list(root / name))
        for split, name in (("validation", "validation_list.txt"), ("test", "testing_list.txt"))
    }
    val_file, validation = lists["validation"]
    test_file, test = lists["test"]
    b = _Builder(str(root))
    seen: set[str] = set()
    words: list[str] = []
    # Folders starting with '_' (_background_noise_) or '.' hold no words.
    word_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(("_", ".")))
    for word_dir in word_dirs:
        wavs = sorted(p for p in word_dir.iterdir() if p.suffix.lower() == ".wav" and p.is_file())
        if wavs:
            words.append(word_dir.name)
        for wav in wavs:
            b.rows_read += 1
            entry = f"{word_dir.name}/{wav.name}"
            seen.add(entry)
            if entry in test:
                split = "test"
                if entry in validation:
                    # Kept as test: a clip in both must not be tuned on.
                    b.problem(validation[entry], f"{entry} is also in {test_file.name}: kept as test", str(val_file))
            elif entry in validation:
                split = "validation"
            else:
                split = "train"
            clip_id = _safe_id(f"{word_dir.name}_{wav.stem}")
            problem = check_clip_id(clip_id)
            if problem is not None:
                b.problem(0, f"gives no usable clip id: {problem}; rename the file", str(wav))
                continue
            b.add(0, clip_id, str(wav), 0.0, math.nan, word_dir.name, split)
    for list_file, entries in (lists["validation"], lists["test"]):
        for entry, line in entries.items():
            if entry not in seen:
                b.problem(line, f"listed file {entry!r} not found under {root}", str(list_file))
    if not words:
        raise ListError(
            f"{root}: no <word>/*.wav files; point the list's `path` at the unpacked Speech Commands folder"
        )
    return b.result(), classes_from_labels(words)


def read_user_list(path: _PathLike, split: str | None = None) -> ParsedList:
    """A CSV with header ``clip_id,source,start,end,labels,split``; ``split`` (if given) overrides the column.

    A row whose ``clip_id`` fails :func:`check_clip_id` is a problem row (ids are used as
    file names as given, never rewritten). ``end`` may be empty (to the end of the file);
    otherwise it must be after ``start``.
    """
    path = Path(path)
    file = str(path)
    _check_split(split, f"user list {path}", required=False)
    b = _Builder(file)
    header: dict[str, int] | None = None
    width, has_split = 0, False

    def bad_line(line: int, problem: str) -> None:
        if header is None:
            raise ListError(f"{file}: line {line}: cannot read the header: {problem}")
        b.unreadable(line, problem)

    for line, row in _rows(path, bad_line):
        if header is None:
            names = [x.strip() for x in row]
            unknown = [n for n in names if n not in _USER_COLUMNS]
            if unknown:
                raise ListError(
                    f"{file}: line {line}: unknown column{'s' if len(unknown) > 1 else ''} "
                    f"{', '.join(repr(n) for n in unknown)}; a user list has the columns "
                    f"{','.join(_USER_COLUMNS)} (split optional when the config gives `split`): remove or rename them"
                )
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ListError(f"{file}: line {line}: column {repeated[0]!r} appears twice in the header; remove one")
            required = [n for n in _USER_COLUMNS if n != "split" or split is None]
            absent = [n for n in required if n not in names]
            if absent:
                raise ListError(
                    f"{file}: line {line}: header lacks {', '.join(absent)} (found {','.join(names)!r}); "
                    f"a user list starts with the header {','.join(_USER_COLUMNS)}"
                    + (" (or give the list a `split` in the config)" if absent == ["split"] else "")
                )
            header = {n: i for i, n in enumerate(names)}
            width = len(names)
            has_split = "split" in header
            continue
        b.rows_read += 1
        if len(row) != width:
            b.problem(line, f"expected {width} fields like the header, found {len(row)}")
            continue
        clip_id = row[header["clip_id"]].strip()
        problem = check_clip_id(clip_id)
        if problem is not None:
            b.problem(line, problem)
            continue
        source = row[header["source"]].strip()
        if not source:
            b.problem(line, "empty source")
            continue
        span = _span(row[header["start"]].strip(), row[header["end"]].strip(), open_end=True)
        if isinstance(span, str):
            b.problem(line, span)
            continue
        labels = _labels(row[header["labels"]].split(";"), None)
        if isinstance(labels, tuple):
            b.problem(line, labels[0])
            continue
        row_split = split if split is not None else (row[header["split"]].strip() if has_split else "")
        if not row_split:
            b.problem(line, "empty split")
            continue
        b.add(line, clip_id, source, span[0], span[1], labels, row_split)
    if header is None:
        raise ListError(f"{file}: empty; a user list starts with the header {','.join(_USER_COLUMNS)}")
    return b.result()


# MSR-VTT has no classes that retrieval uses: every clip gets this one label.
MSRVTT_LABEL = "msrvtt"


def read_msrvtt(path: _PathLike, split: str | None = None) -> ParsedList:
    """MSR-VTT's test ids: the 1k-A split's ``MSRVTT_JSFUSION_test.csv`` (``key,vid_key,
    video_id,sentence``) or a file of one id per line (``test_list_miech.txt``).

    The clip id is the video id (``video7020``), which names the file in MSR-VTT's archive
    (``videos/all/video7020.mp4``): the list gives no other source. Each clip is its whole
    video (start 0, no end), split ``test`` unless ``split`` says otherwise, label
    :data:`MSRVTT_LABEL`. A video listed twice is left to :func:`combine_lists` (an identical
    repeat is collapsed and reported).
    """
    path = Path(path)
    file = str(path)
    split = split or "test"
    b = _Builder(file)
    column: int | None = None

    def bad_line(line: int, problem: str) -> None:
        b.unreadable(line, problem)

    for line, row in _rows(path, bad_line):
        fields = [x.strip() for x in row]
        if column is None and "video_id" in fields:
            column = fields.index("video_id")
            continue
        b.rows_read += 1
        if column is not None and len(fields) <= column:
            b.problem(line, f"expected a video_id in field {column + 1}, found {len(fields)} field(s)")
            continue
        video = fields[column] if column is not None else fields[0]
        problem = check_clip_id(video)
        if problem is not None:
            b.problem(line, f"video id {video!r}: {problem}")
            continue
        b.add(line, video, video, 0.0, math.nan, MSRVTT_LABEL, split)
    return b.result()

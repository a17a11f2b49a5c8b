"""Clip lists of the supported data sets, parsed into one manifest schema.

Every parser returns a :class:`ParsedList`: the usable rows as a manifest DataFrame
(columns :data:`MANIFEST_COLUMNS`), one :class:`ListProblem` per dropped row (with its
1-based line number), and the number of data rows read. A row that cannot be used is
dropped and reported, never silently; a file that cannot be used at all raises
:class:`ListError`.

No field of the supported formats spans lines, so every physical line is parsed on its
own: a line whose quoting is unbalanced (a ``"`` that opens a field the line does not
close) is one problem on that line, and the next line is read normally. Lines starting
with ``#`` and blank lines are skipped; a UTF-8 BOM is ignored; spaces after a comma are
skipped (the official AudioSet ``", "`` separators).

Clip ids name files and folders in the later stages, so every id a parser makes passes
:func:`check_clip_id`: 1 to :data:`MAX_CLIP_ID_LENGTH` characters of A-Z a-z 0-9 _ . -,
not starting with ``.`` (so never ``.``, ``..`` or a hidden name). YouTube segments
need a start ``>= 0`` and an end after it (a zero-length segment is a problem).

Parsers do not deduplicate: :func:`combine_lists` is the one place where clip ids become
unique, so that the configured duplicate policy also covers repeats inside one file. Pass
every parsed list through it, even a single one.

A class table is a DataFrame with columns ``index`` (model output order 0..C-1), ``id``
(what the manifest's ``labels`` hold, joined by ``;``) and ``name`` (for display).
"""

from __future__ import annotations

from equiav.data.lists.classes import classes_from_labels, read_audioset_classes, read_vggsound_classes
from equiav.data.lists.combine import check_bad_fraction, combine_lists, write_problems
from equiav.data.lists.local import read_esc50, read_msrvtt, read_speech_commands, read_user_list
from equiav.data.lists.rows import (
    MANIFEST_COLUMNS,
    MAX_CLIP_ID_LENGTH,
    ListError,
    ListProblem,
    ParsedList,
    check_clip_id,
)
from equiav.data.lists.youtube import read_audioset_segments, read_vggsound_list, read_vggsound_test_list

__all__ = [
    "MANIFEST_COLUMNS",
    "MAX_CLIP_ID_LENGTH",
    "ListError",
    "ListProblem",
    "ParsedList",
    "check_clip_id",
    "read_audioset_classes",
    "read_vggsound_classes",
    "classes_from_labels",
    "read_audioset_segments",
    "read_vggsound_list",
    "read_vggsound_test_list",
    "read_esc50",
    "read_speech_commands",
    "read_user_list",
    "read_msrvtt",
    "combine_lists",
    "write_problems",
    "check_bad_fraction",
]

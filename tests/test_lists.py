"""Tests of equiav.data.lists on excerpts of the real lists (tests/data/lists/) and made-up files."""

from __future__ import annotations

import csv
import math
import re
import wave
from pathlib import Path

import pandas as pd
import pytest

from equiav.data.lists import (
    MANIFEST_COLUMNS,
    MAX_CLIP_ID_LENGTH,
    ListError,
    ListProblem,
    ParsedList,
    check_bad_fraction,
    check_clip_id,
    classes_from_labels,
    combine_lists,
    read_audioset_classes,
    read_audioset_segments,
    read_esc50,
    read_speech_commands,
    read_user_list,
    read_vggsound_classes,
    read_vggsound_list,
    read_vggsound_test_list,
    write_problems,
)

DATA = Path(__file__).parent / "data" / "lists"
AUDIOSET_TRAIN = DATA / "audioset_balanced_train_excerpt.csv"
AUDIOSET_EVAL = DATA / "audioset_eval_excerpt.csv"
VGGSOUND_TEST = DATA / "vggsound_test_excerpt.csv"
VGGSOUND_4COL = DATA / "vggsound_4col_excerpt.csv"
ESC50 = DATA / "esc50_excerpt.csv"
SAFE_ID = re.compile(r"[A-Za-z0-9_.-]+\Z")
ID_RULE = "a clip id names files, so it must be 1 to 200 characters of A-Z a-z 0-9 _ . - and must not start with '.'"


@pytest.fixture(scope="module")
def audioset_classes() -> pd.DataFrame:
    return read_audioset_classes(DATA / "audioset_class_labels_indices.csv")


@pytest.fixture(scope="module")
def vggsound_classes() -> pd.DataFrame:
    return read_vggsound_classes(DATA / "vggsound_stat.csv")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _write_wav(path: Path) -> None:
    """A tiny valid mono 16-bit WAV (10 ms of silence)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 80)


def _row(parsed: ParsedList, clip_id: str) -> dict:
    rows = parsed.manifest[parsed.manifest["clip_id"] == clip_id]
    assert len(rows) == 1, f"{clip_id} appears {len(rows)} times"
    return rows.iloc[0].to_dict()


def _check_schema(manifest: pd.DataFrame) -> None:
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    assert all(SAFE_ID.match(c) and check_clip_id(c) is None for c in manifest["clip_id"])
    assert manifest["start"].dtype == "float64" and manifest["end"].dtype == "float64"


# ---------------------------------------------------------------------------------------
# Class tables


def test_manifest_columns() -> None:
    assert MANIFEST_COLUMNS == ("clip_id", "source", "start", "end", "labels", "split")


def test_audioset_classes(audioset_classes: pd.DataFrame) -> None:
    assert list(audioset_classes.columns) == ["index", "id", "name"]
    assert len(audioset_classes) == 527
    assert audioset_classes["index"].tolist() == list(range(527))
    assert audioset_classes.iloc[0].tolist() == [0, "/m/09x0r", "Speech"]
    assert audioset_classes.iloc[1]["name"] == "Male speech, man speaking"
    assert audioset_classes.iloc[526].tolist() == [526, "/m/07hvw1", "Field recording"]


def test_vggsound_classes_are_the_309_labels_sorted(vggsound_classes: pd.DataFrame) -> None:
    ids = vggsound_classes["id"].tolist()
    assert len(ids) == 309
    assert ids == sorted(ids)
    assert ids[:2] == ["air conditioning noise", "air horn"]
    assert "bird chirping, tweeting" in ids  # quoted in stat.csv
    assert vggsound_classes["name"].tolist() == ids
    assert vggsound_classes["index"].tolist() == list(range(309))


def test_vggsound_classes_refuses_another_file() -> None:
    with pytest.raises(ListError, match=r"expected 'label,count,category', found 2 fields.*stat\.csv"):
        read_vggsound_classes(VGGSOUND_TEST)


def test_classes_from_labels() -> None:
    table = classes_from_labels(["dog", "bird", "dog", "cat"])
    assert table["id"].tolist() == ["bird", "cat", "dog"]
    assert table["name"].tolist() == ["bird", "cat", "dog"]
    assert table["index"].tolist() == [0, 1, 2]


def test_class_ids_must_not_contain_semicolons() -> None:
    with pytest.raises(ListError, match=r"'a;b' contains ';'"):
        classes_from_labels(["a;b", "c"])


# ---------------------------------------------------------------------------------------
# AudioSet


def test_audioset_official_format(audioset_classes: pd.DataFrame) -> None:
    parsed = read_audioset_segments(AUDIOSET_TRAIN, "train", audioset_classes)
    _check_schema(parsed.manifest)
    assert parsed.problems == []
    assert parsed.rows_read == 30
    assert len(parsed.manifest) == 30
    assert parsed.manifest.iloc[0].to_dict() == {
        "clip_id": "--PJHxphWEs_000030",
        "source": "--PJHxphWEs",
        "start": 30.0,
        "end": 40.0,
        "labels": "/m/09x0r;/t/dd00088",
        "split": "train",
    }
    assert _row(parsed, "--aE2O5G5WE_000000")["labels"] == "/m/03fwl;/m/04rlf;/m/09x0r"
    # A start that is not a whole second gets a millisecond id.
    odd = _row(parsed, "AE5oZzfu2-E_000239800ms")
    assert (odd["start"], odd["end"]) == (239.8, 249.8)
    # Segments shorter than 10 s keep their own end.
    assert _row(parsed, "-Fby-7z_JpE_000000")["end"] == 8.0
    assert parsed.origin is not None
    assert parsed.origin["line"].tolist()[:3] == [4, 5, 6]  # after the three '#' lines


@pytest.mark.parametrize("header", [True, False])
def test_audioset_resaved_parses_like_official(tmp_path: Path, audioset_classes: pd.DataFrame, header: bool) -> None:
    official = read_audioset_segments(AUDIOSET_TRAIN, "train", audioset_classes)
    table = pd.read_csv(
        AUDIOSET_TRAIN,
        comment="#",
        header=None,
        skipinitialspace=True,
        names=["YTID", "start_seconds", "end_seconds", "positive_labels"],
    )
    resaved = tmp_path / "resaved.csv"
    table.to_csv(resaved, index=False, header=header)
    text = resaved.read_text()
    assert "#" not in text and ", " not in text.replace('", "', "")  # really the other form
    assert ("--PJHxphWEs,30.0,40.0," in text) and ("--ZhevVpy1s,50.0,60.0,/m/012xff" in text)

    parsed = read_audioset_segments(resaved, "train", audioset_classes)
    pd.testing.assert_frame_equal(parsed.manifest, official.manifest)
    assert parsed.problems == []
    assert parsed.rows_read == official.rows_read == 30
    assert parsed.origin["line"].iloc[0] == (2 if header else 1)


def test_audioset_malformed_rows_are_reported_with_their_lines(tmp_path: Path, audioset_classes: pd.DataFrame) -> None:
    path = _write(
        tmp_path / "segments.csv",
        "# Segments csv created Sun Mar  5 10:54:31 2017\n"  # 1
        "# num_ytids=9\n"  # 2
        "# YTID, start_seconds, end_seconds, positive_labels\n"  # 3
        '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"\n'  # 4 ok
        "\n"  # 5 blank
        '--ZhevVpy1s, 50.000, "/m/012xff"\n'  # 6 three fields
        '--aE2O5G5WE, zero, 10.000, "/m/03fwl"\n'  # 7 bad number
        '--aO5cdqSAg, 40.000, 30.000, "/t/dd00003"\n'  # 8 start after end
        'short, 30.000, 40.000, "/m/09x0r"\n'  # 9 bad YouTube id
        '--aaILOrkII, 200.000, 210.000, "/m/032s66,/m/notaclass"\n'  # 10 unknown label
        '--cB2ZVjpnA, 30.000, 40.000, ""\n'  # 11 no labels
        "# a comment in the middle\n"  # 12
        '--ekDLDTUXA, -5.000, 40.000, "/m/015lz1"\n'  # 13 negative start
        '-0DLPzsiXXE, 30.000, 40.000, "/m/04rlf,/m/07qwdck"\n',  # 14 ok
    )
    parsed = read_audioset_segments(path, "eval", audioset_classes)
    assert parsed.manifest["clip_id"].tolist() == ["--PJHxphWEs_000030", "-0DLPzsiXXE_000030"]
    assert parsed.manifest["split"].tolist() == ["eval", "eval"]
    assert parsed.origin["line"].tolist() == [4, 14]
    assert parsed.rows_read == 9
    assert [p.line for p in parsed.problems] == [6, 7, 8, 9, 10, 11, 13]
    assert all(p.file == str(path) for p in parsed.problems)
    texts = [p.problem for p in parsed.problems]
    assert "found 3" in texts[0]
    assert "'zero'" in texts[1]
    assert "not before" in texts[2]
    assert "'short'" in texts[3]
    assert "'/m/notaclass'" in texts[4] and "/m/032s66" not in texts[4]
    assert texts[5] == "empty labels"
    assert "negative" in texts[6]


def test_missing_list_file_names_the_path(tmp_path: Path, audioset_classes: pd.DataFrame) -> None:
    with pytest.raises(ListError, match=r"nowhere\.csv: no such file"):
        read_audioset_segments(tmp_path / "nowhere.csv", "train", audioset_classes)


# ---------------------------------------------------------------------------------------
# VGGSound


def test_vggsound_test_list(vggsound_classes: pd.DataFrame) -> None:
    parsed = read_vggsound_test_list(VGGSOUND_TEST, "test", vggsound_classes)
    _check_schema(parsed.manifest)
    assert parsed.problems == []
    assert parsed.rows_read == len(parsed.manifest) == 30
    assert parsed.manifest.iloc[0].to_dict() == {
        "clip_id": "glLQrEijrKg_000300",
        "source": "glLQrEijrKg",
        "start": 300.0,
        "end": 310.0,
        "labels": "playing hammond organ",
        "split": "test",
    }
    quoted = _row(parsed, "0_8-g2rof7E_000049")
    assert (quoted["source"], quoted["labels"]) == ("0_8-g2rof7E", "heart sounds, heartbeat")
    assert _row(parsed, "-XxUW9gW6mc_000060")["labels"] == "wind rustling leaves"
    lines = dict(zip(parsed.manifest["clip_id"], parsed.origin["line"]))
    assert lines["0_8-g2rof7E_000049"] == 26
    # Without a class table the same rows come out.
    unchecked = read_vggsound_test_list(VGGSOUND_TEST, "test", None)
    pd.testing.assert_frame_equal(unchecked.manifest, parsed.manifest)


def test_vggsound_full_list(vggsound_classes: pd.DataFrame) -> None:
    parsed = read_vggsound_list(VGGSOUND_4COL, vggsound_classes)
    _check_schema(parsed.manifest)
    assert parsed.problems == []
    assert parsed.rows_read == 11
    assert parsed.manifest.iloc[0].to_dict() == {
        "clip_id": "---g-f_I2yQ_000001",
        "source": "---g-f_I2yQ",
        "start": 1.0,
        "end": 11.0,
        "labels": "people marching",
        "split": "test",
    }
    second = _row(parsed, "--9O4XZOge4_000030")
    assert (second["labels"], second["split"]) == ("female speech, woman speaking", "train")
    assert parsed.manifest["split"].value_counts().to_dict() == {"test": 6, "train": 5}
    # Rows taken from test.csv give the same manifest rows in both forms.
    test_form = read_vggsound_test_list(VGGSOUND_TEST, "test", vggsound_classes)
    for clip_id in ("glLQrEijrKg_000300", "0_8-g2rof7E_000049", "aEYwqY-Zt_k_000011"):
        assert _row(parsed, clip_id) == _row(test_form, clip_id)


def test_vggsound_malformed_rows(tmp_path: Path, vggsound_classes: pd.DataFrame) -> None:
    full = _write(
        tmp_path / "vggsound.csv",
        "---g-f_I2yQ,1,people marching,test\n"  # 1 ok
        "--9O4XZOge4,ten,people marching,train\n"  # 2 bad start
        "--9O4XZOge4,30,people juggling,train\n"  # 3 unknown label
        "--9O4XZOge4,30,people marching\n"  # 4 three fields
        "--9O4XZOge4,40,people marching,\n"  # 5 empty split
        "--9O4XZOge,50,people marching,train\n",  # 6 ten-character id
    )
    parsed = read_vggsound_list(full, vggsound_classes)
    assert parsed.manifest["clip_id"].tolist() == ["---g-f_I2yQ_000001"]
    assert [(p.line, p.problem.split(" ")[0]) for p in parsed.problems] == [
        (2, "bad"),
        (3, "unknown"),
        (4, "expected"),
        (5, "empty"),
        (6, "malformed"),
    ]
    assert "'people juggling'" in parsed.problems[1].problem

    test = _write(
        tmp_path / "test.csv",
        "glLQrEijrKg_000300.mp4,playing hammond organ\r\n"  # 1 ok
        "glLQrEijrKg.mp4,playing hammond organ\r\n"  # 2 no start
        "\r\n"  # 3 blank
        "LDoXsip0BEQ_000177.mp4,\r\n"  # 4 empty label
        'cRlp5v9BHeE_000011.mp4,"car passing by",extra\r\n',  # 5 three fields
    )
    parsed = read_vggsound_test_list(test, "test", vggsound_classes)
    assert parsed.manifest["clip_id"].tolist() == ["glLQrEijrKg_000300"]
    assert [p.line for p in parsed.problems] == [2, 4, 5]
    assert parsed.problems[1].problem == "empty labels"
    assert parsed.rows_read == 4


# ---------------------------------------------------------------------------------------
# ESC-50 and Speech Commands


def _esc50_audio(tmp_path: Path) -> Path:
    audio = tmp_path / "audio"
    names = [line.split(",")[0] for line in ESC50.read_text().splitlines()[1:]]
    for name in names:
        _write_wav(audio / name)
    return audio


def test_esc50(tmp_path: Path) -> None:
    audio = _esc50_audio(tmp_path)
    parsed, classes = read_esc50(ESC50, audio)
    _check_schema(parsed.manifest)
    assert parsed.problems == []
    assert parsed.rows_read == len(parsed.manifest) == 30
    first = parsed.manifest.iloc[0].to_dict()
    assert math.isnan(first.pop("end"))
    assert first == {
        "clip_id": "1-100-A-0",
        "source": str(audio / "1-100-A-0.wav"),
        "start": 0.0,
        "labels": "Asianlongharnbeetle",
        "split": "fold1",
    }
    assert sorted(parsed.manifest["split"].unique()) == ["fold1", "fold2", "fold3", "fold4", "fold5"]
    assert sorted(parsed.manifest.loc[parsed.manifest["split"] == "fold5", "labels"].unique()) == [
        "Carpenter- bee",
        "Crickets",
    ]
    # The original's typo "2-102-A-2 wav" still gives a file-name-safe id.
    assert _row(parsed, "2-102-A-2_wav")["source"] == str(audio / "2-102-A-2 wav")
    assert classes["index"].tolist() == list(range(10))
    assert classes["id"].tolist() == [
        "Asianlongharnbeetle",
        "Cicada",
        "Cicada2",
        "Locust",
        "Rootborer",
        "Stemborer",
        "Weevil",
        "Grasshopper",
        "Carpenter- bee",
        "Crickets",
    ]
    assert classes["name"].tolist() == classes["id"].tolist()


def test_esc50_missing_audio(tmp_path: Path) -> None:
    audio = tmp_path / "audio"
    _write_wav(audio / "1-100-A-0.wav")
    parsed, _ = read_esc50(ESC50, audio)
    assert len(parsed.manifest) == 30  # the download stage reports the missing ones
    with pytest.raises(ListError, match=r"none of the 30 files.*set `audio_dir`"):
        read_esc50(ESC50, tmp_path / "elsewhere")


def test_esc50_bad_rows(tmp_path: Path) -> None:
    csv_path = _write(
        tmp_path / "esc50.csv",
        "filename,fold,target,category,esc10,src_file,take\n"
        "1-100-A-0.wav,1,0,Dog,False,100,A\n"
        "1-100-B-0.wav,1,zero,Dog,False,100,B\n"  # line 3
        "1-101-A-1.wav,2,1,Rooster,False,101,A\n"
        "1-101-B-1.wav,2,1,Rooster\n",  # line 5
    )
    audio = tmp_path / "audio"
    _write_wav(audio / "1-100-A-0.wav")
    parsed, classes = read_esc50(csv_path, audio)
    assert parsed.manifest["clip_id"].tolist() == ["1-100-A-0", "1-101-A-1"]
    assert [(p.line, p.problem) for p in parsed.problems] == [
        (3, "bad target 'zero': not an integer >= 0"),
        (5, "expected 7 fields like the header, found 4"),
    ]
    assert classes["id"].tolist() == ["Dog", "Rooster"]


def _speech_commands(root: Path) -> None:
    files = {
        "right": ["0a7c2a8d_nohash_0", "bb05582b_nohash_0", "bb05582b_nohash_1"],
        "yes": ["0a7c2a8d_nohash_0", "0c2ca723_nohash_0"],
        "zero": ["0a7c2a8d_nohash_1", "1b4c9b89_nohash_0"],
    }
    for word, stems in files.items():
        for stem in stems:
            _write_wav(root / word / f"{stem}.wav")
    _write_wav(root / "_background_noise_" / "white_noise.wav")
    _write(root / "validation_list.txt", "right/bb05582b_nohash_0.wav\nyes/0c2ca723_nohash_0.wav\n")
    _write(root / "testing_list.txt", "right/0a7c2a8d_nohash_0.wav\nzero/0a7c2a8d_nohash_1.wav\n")


def test_speech_commands(tmp_path: Path) -> None:
    _speech_commands(tmp_path)
    parsed, classes = read_speech_commands(tmp_path)
    _check_schema(parsed.manifest)
    assert parsed.problems == []
    assert parsed.rows_read == 7
    assert classes["id"].tolist() == ["right", "yes", "zero"]
    splits = dict(zip(parsed.manifest["clip_id"], parsed.manifest["split"]))
    assert splits == {
        "right_0a7c2a8d_nohash_0": "test",
        "right_bb05582b_nohash_0": "validation",
        "right_bb05582b_nohash_1": "train",
        "yes_0a7c2a8d_nohash_0": "train",
        "yes_0c2ca723_nohash_0": "validation",
        "zero_0a7c2a8d_nohash_1": "test",
        "zero_1b4c9b89_nohash_0": "train",
    }
    row = _row(parsed, "zero_1b4c9b89_nohash_0")
    assert (row["source"], row["labels"], row["start"]) == (
        str(tmp_path / "zero" / "1b4c9b89_nohash_0.wav"),
        "zero",
        0.0,
    )
    assert math.isnan(row["end"])


def test_speech_commands_list_problems(tmp_path: Path) -> None:
    _speech_commands(tmp_path)
    with open(tmp_path / "testing_list.txt", "a") as f:
        f.write("no/ffffffff_nohash_0.wav\n")  # line 3: not on disk
    parsed, _ = read_speech_commands(tmp_path)
    assert parsed.problems == [
        ListProblem(
            str(tmp_path / "testing_list.txt"), 3, f"listed file 'no/ffffffff_nohash_0.wav' not found under {tmp_path}"
        )
    ]
    (tmp_path / "validation_list.txt").unlink()
    with pytest.raises(ListError, match=r"validation_list\.txt: missing"):
        read_speech_commands(tmp_path)


# ---------------------------------------------------------------------------------------
# User lists


USER_HEADER = "clip_id,source,start,end,labels,split\n"


def test_user_list(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "mine.csv",
        USER_HEADER
        + "a1,https://example.org/a.mp4,0,4.5,dog;cat,train\n"
        + "b2,/data/b.wav,1.5,,cat,test\n"
        + 'c3,dQw4w9WgXcQ,30,40," dog ; bird ",train\n',
    )
    parsed = read_user_list(path)
    _check_schema(parsed.manifest)
    assert parsed.problems == []
    assert parsed.manifest["clip_id"].tolist() == ["a1", "b2", "c3"]
    assert parsed.manifest["source"].tolist() == ["https://example.org/a.mp4", "/data/b.wav", "dQw4w9WgXcQ"]
    assert parsed.manifest["labels"].tolist() == ["dog;cat", "cat", "dog;bird"]
    assert parsed.manifest["split"].tolist() == ["train", "test", "train"]
    assert parsed.manifest["start"].tolist() == [0.0, 1.5, 30.0]
    ends = parsed.manifest["end"].tolist()
    assert ends[0] == 4.5 and math.isnan(ends[1]) and ends[2] == 40.0
    assert read_user_list(path, split="eval").manifest["split"].tolist() == ["eval"] * 3


def test_user_list_split_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.csv", "source,clip_id,start,end,labels\n/x.wav,x,0,,dog\n")
    parsed = read_user_list(path, split="train")
    assert parsed.manifest.iloc[0][["clip_id", "source", "split"]].tolist() == ["x", "/x.wav", "train"]
    with pytest.raises(ListError, match=r"header lacks split.*give the list a `split`"):
        read_user_list(path)


def test_user_list_unknown_columns(tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.csv", "clip_id,source,start,end,labels,split,duration,notes\n")
    with pytest.raises(ListError, match=r"unknown columns 'duration', 'notes'"):
        read_user_list(path)


def test_user_list_bad_rows(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "mine.csv",
        "# my clips\n"  # 1
        + USER_HEADER  # 2
        + "ok1,/a.wav,0,,dog,train\n"  # 3
        + "not ok,/b.wav,0,,dog,train\n"  # 4 space in id
        + "c,,0,,dog,train\n"  # 5 empty source
        + "\n"  # 6
        + "d,/d.wav,5,2,dog,train\n"  # 7 start after end
        + "e,/e.wav,0,,;,train\n"  # 8 no labels
        + "f,/f.wav,0,,dog\n"  # 9 five fields
        + "g,/g.wav,0,,dog,\n"  # 10 empty split
        + "ok2,/h.wav,0,1,dog,test\n",  # 11
    )
    parsed = read_user_list(path)
    assert parsed.manifest["clip_id"].tolist() == ["ok1", "ok2"]
    assert parsed.rows_read == 8  # the comment, header and blank lines are not rows
    assert [(p.line, p.problem) for p in parsed.problems] == [
        (4, f"clip_id 'not ok' contains ' ': {ID_RULE}"),
        (5, "empty source"),
        (7, "start 5 is not before end 2"),
        (8, "empty labels"),
        (9, "expected 6 fields like the header, found 5"),
        (10, "empty split"),
    ]


# ---------------------------------------------------------------------------------------
# Clip ids are safe file names


@pytest.mark.parametrize("clip_id", ["a", "A-1_b.c", "a..", "-", "_", "x.", "x" * MAX_CLIP_ID_LENGTH])
def test_check_clip_id_accepts_safe_file_names(clip_id: str) -> None:
    assert check_clip_id(clip_id) is None


@pytest.mark.parametrize(
    ("clip_id", "reason"),
    [
        ("..", "starts with '.'"),  # the media folder's parent: the download stage deleted a shard's data
        (".", "starts with '.'"),
        (".hidden", "starts with '.'"),
        ("a b", "contains ' '"),
        ("../x", "contains '/'"),
        ("a\\b", "contains '\\\\'"),
        ("caf\u00e9", "contains '\u00e9'"),
        ("x" * (MAX_CLIP_ID_LENGTH + 1), "is 201 characters long"),
    ],
)
def test_check_clip_id_refuses_unsafe_names(clip_id: str, reason: str) -> None:
    problem = check_clip_id(clip_id)
    assert problem is not None and reason in problem and problem.endswith(ID_RULE)


def test_check_clip_id_refuses_empty_and_non_text() -> None:
    assert check_clip_id("") == "empty clip_id"
    assert check_clip_id(float("nan")).startswith("clip_id nan is a float, not text")  # an empty cell read by pandas
    assert MAX_CLIP_ID_LENGTH == 200


def test_user_list_refuses_ids_that_are_not_safe_file_names(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "mine.csv",
        USER_HEADER  # 1
        + "ok1,/a.wav,0,,dog,train\n"  # 2
        + "..,/b.wav,0,,dog,train\n"  # 3
        + ".,/c.wav,0,,dog,train\n"  # 4
        + ".hidden,/d.wav,0,,dog,train\n"  # 5
        + f"{'x' * 201},/e.wav,0,,dog,train\n"  # 6
        + f"{'y' * 200},/f.wav,0,,dog,train\n",  # 7 just short enough
    )
    parsed = read_user_list(path)
    assert parsed.manifest["clip_id"].tolist() == ["ok1", "y" * 200]
    assert [p.line for p in parsed.problems] == [3, 4, 5, 6]
    assert parsed.problems[0].problem == f"clip_id '..' starts with '.': {ID_RULE}"
    assert "201 characters long" in parsed.problems[3].problem


def test_esc50_ids_from_awkward_file_names_are_safe(tmp_path: Path) -> None:
    long_name = "z" * 201 + ".wav"
    csv_path = _write(
        tmp_path / "esc50.csv",
        "filename,fold,target,category\n"  # 1
        ".hidden.wav,1,0,Dog\n"  # 2
        "...wav,1,0,Dog\n"  # 3
        f"{long_name},1,0,Dog\n"  # 4
        "a b.wav,1,0,Dog\n",  # 5
    )
    audio = tmp_path / "audio"
    _write_wav(audio / "a b.wav")
    parsed, _ = read_esc50(csv_path, audio)
    _check_schema(parsed.manifest)
    assert parsed.manifest["clip_id"].tolist() == ["_hidden", "_.", "a_b"]
    assert parsed.manifest["source"].iloc[0] == str(audio / ".hidden.wav")  # the file keeps its name
    assert [p.line for p in parsed.problems] == [4]
    assert f"filename {long_name!r} gives no usable clip id" in parsed.problems[0].problem
    assert "is 201 characters long" in parsed.problems[0].problem


def test_speech_commands_too_long_file_name_is_reported(tmp_path: Path) -> None:
    _speech_commands(tmp_path)
    long_wav = tmp_path / "yes" / ("a" * 200 + ".wav")  # id yes_aaa... is 204 characters
    _write_wav(long_wav)
    parsed, _ = read_speech_commands(tmp_path)
    _check_schema(parsed.manifest)
    assert len(parsed.manifest) == 7 and parsed.rows_read == 8
    assert [(p.file, p.line) for p in parsed.problems] == [(str(long_wav), 0)]
    assert "is 204 characters long" in parsed.problems[0].problem


def test_youtube_lists_refuse_starts_that_make_too_long_ids(tmp_path: Path) -> None:
    audioset = _write(tmp_path / "a.csv", '--PJHxphWEs, 1e250, 2e250, "/m/09x0r"\n--PJHxphWEs, 30, 40, "/m/09x0r"\n')
    parsed = read_audioset_segments(audioset, "train", None)
    assert parsed.manifest["clip_id"].tolist() == ["--PJHxphWEs_000030"]
    assert [p.line for p in parsed.problems] == [1]
    assert parsed.problems[0].problem.startswith("start 1e250 is too large: clip_id '--PJHxphWEs_")
    # A 400-digit start is infinite as a float: it once crashed the parser.
    test_list = _write(tmp_path / "t.csv", f"--PJHxphWEs_{'9' * 400}.mp4,dog\n--PJHxphWEs_{'9' * 250}.mp4,dog\n")
    parsed = read_vggsound_test_list(test_list, "test", None)
    assert len(parsed.manifest) == 0
    assert [p.line for p in parsed.problems] == [1, 2]
    assert all("is too large" in p.problem for p in parsed.problems)
    # In VGGSound's lists a start that large already loses its 10 s (see the zero-length test).
    full = _write(tmp_path / "v.csv", "--PJHxphWEs,1e250,dog,train\n--PJHxphWEs,30,dog,train\n")
    parsed = read_vggsound_list(full, None)
    assert parsed.manifest["clip_id"].tolist() == ["--PJHxphWEs_000030"]
    assert [p.line for p in parsed.problems] == [1]
    assert parsed.problems[0].problem == "start 1e250 is too large: the 10 s clip from it would have no length"


# ---------------------------------------------------------------------------------------
# Every physical line is parsed on its own


def test_a_stray_quote_is_one_problem_and_the_following_lines_are_read(tmp_path: Path) -> None:
    lines = ["clip_id,source,start,end,labels,split"] + [f"c{i},/c{i}.wav,0,,dog,train" for i in range(2, 202)]
    lines[150] = 'c151,/c151.wav,0,,"dog,train'  # line 151; the next quote is on line 201
    lines[200] = 'c201,/c201.wav,0,,"dog",train'
    parsed = read_user_list(_write(tmp_path / "mine.csv", "\n".join(lines) + "\n"))
    assert len(parsed.manifest) == 199 and parsed.rows_read == 200
    assert [(p.line, p.problem) for p in parsed.problems] == [
        (151, "unbalanced quoting: a '\"' opens a quoted field that this line does not close (no field of "
         "these lists spans lines); close the quote or remove it")
    ]  # fmt: skip
    assert parsed.origin["line"].tolist() == [n for n in range(2, 202) if n != 151]
    assert parsed.manifest["clip_id"].iloc[-1] == "c201"


@pytest.mark.parametrize(
    ("fmt", "text", "lines_kept"),
    [
        (
            "audioset",
            '# YTID, "start_seconds, end_seconds, positive_labels\n'  # 1 a comment, even with a stray quote
            '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088\n'  # 2
            '--ZhevVpy1s, 50.000, 60.000, "/m/012xff"\n'  # 3
            '--aE2O5G5WE, 0.000, 10.000, "/m/03fwl"\n',  # 4
            [3, 4],
        ),
        ("vggsound", '---g-f_I2yQ,1,"people, marching,test\n--9O4XZOge4,30,"people marching",train\n', [2]),
        ("vggsound_test", '"glLQrEijrKg_000300.mp4,organ\r\nLDoXsip0BEQ_000177.mp4,"dog"\r\n', [2]),
        ("user", USER_HEADER + 'a,/a.wav,0,,"dog,train\nb,/b.wav,0,,dog,train', [3]),  # no final newline
        ("user", USER_HEADER + 'a,/a.wav,0,,dog,train\nb,/b.wav,0,,"dog,train', [2]),  # the last line
        ("user", USER_HEADER + '"\na,/a.wav,0,,dog,train\n', [3]),  # a lone quote is not a blank line
    ],
)
def test_unbalanced_quoting_in_each_format(tmp_path: Path, fmt: str, text: str, lines_kept: list[int]) -> None:
    path = _write(tmp_path / "list.csv", text)
    readers = {
        "audioset": lambda: read_audioset_segments(path, "train", None),
        "vggsound": lambda: read_vggsound_list(path, None),
        "vggsound_test": lambda: read_vggsound_test_list(path, "test", None),
        "user": lambda: read_user_list(path),
    }
    parsed = readers[fmt]()
    assert parsed.origin["line"].tolist() == lines_kept
    assert len(parsed.problems) == 1 and parsed.problems[0].problem.startswith("unbalanced quoting")
    assert parsed.rows_read == len(lines_kept) + 1


def test_unbalanced_quoting_in_esc50(tmp_path: Path) -> None:
    csv_path = _write(
        tmp_path / "esc50.csv",
        "filename,fold,target,category\n"
        '1-100-A-0.wav,1,0,"Dog\n'  # 2
        "1-100-B-0.wav,1,0,Dog\n"  # 3
        '1-101-A-1.wav,2,1,"Rooster"\n',  # 4
    )
    _write_wav(tmp_path / "audio" / "1-101-A-1.wav")
    parsed, classes = read_esc50(csv_path, tmp_path / "audio")
    assert parsed.manifest["clip_id"].tolist() == ["1-100-B-0", "1-101-A-1"]
    assert [p.line for p in parsed.problems] == [2]
    assert parsed.problems[0].problem.startswith("unbalanced quoting")
    assert classes["id"].tolist() == ["Dog", "Rooster"]


def test_unbalanced_quoting_in_a_header_or_class_table_stops(tmp_path: Path) -> None:
    user = _write(tmp_path / "mine.csv", '"clip_id,source,start,end,labels,split\na,/a.wav,0,,dog,train\n')
    with pytest.raises(ListError, match=r"mine\.csv: line 1: cannot read the header: unbalanced quoting"):
        read_user_list(user)
    classes = _write(tmp_path / "classes.csv", 'index,mid,display_name\n0,/m/09x0r,"Speech\n1,/m/0x,"Male"\n')
    with pytest.raises(ListError, match=r"classes\.csv: line 2: unbalanced quoting.*class table must be complete"):
        read_audioset_classes(classes)


def test_a_line_the_csv_module_refuses_is_one_problem(tmp_path: Path) -> None:
    huge = "x" * (csv.field_size_limit() + 1)
    path = _write(tmp_path / "v.csv", f"---g-f_I2yQ,1,{huge},test\n--9O4XZOge4,30,dog,train\n")
    parsed = read_vggsound_list(path, None)
    assert parsed.origin["line"].tolist() == [2]
    assert [p.line for p in parsed.problems] == [1]
    assert parsed.problems[0].problem.startswith("cannot be read as CSV (field larger than field limit")


def test_bom_comments_and_blank_lines_keep_physical_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "mine.csv"
    path.write_text(
        "\ufeff# mine\r\n" + USER_HEADER + "\r\n  \r\n" + 'a, /a.wav, 0, , "dog, cat", train\r\n', encoding="utf-8"
    )
    parsed = read_user_list(path)
    assert parsed.problems == []
    assert parsed.origin["line"].tolist() == [5]
    assert parsed.manifest[["clip_id", "source", "labels"]].iloc[0].tolist() == ["a", "/a.wav", "dog, cat"]


# ---------------------------------------------------------------------------------------
# Over-long YouTube ids and zero-length segments


@pytest.mark.parametrize("ytid", ["--PJHxphWEs1", "--PJHxphWE", "--PJHx.hWEs"])
def test_youtube_ids_must_have_11_characters_in_every_youtube_format(tmp_path: Path, ytid: str) -> None:
    good = "--ZhevVpy1s"
    official = _write(
        tmp_path / "official.csv", f'{ytid}, 30.000, 40.000, "/m/09x0r"\n{good}, 30.000, 40.000, "/m/09x0r"\n'
    )
    resaved = _write(
        tmp_path / "resaved.csv",
        f"YTID,start_seconds,end_seconds,positive_labels\n{ytid},30.0,40.0,/m/09x0r\n{good},30.0,40.0,/m/09x0r\n",
    )
    full = _write(tmp_path / "full.csv", f"{ytid},30,dog,train\n{good},30,dog,train\n")
    test = _write(tmp_path / "test.csv", f"{ytid}_000030.mp4,dog\n{good}_000030.mp4,dog\n")
    classes = classes_from_labels(["/m/09x0r"])
    for parsed, bad_line in (
        (read_audioset_segments(official, "train", classes), 1),  # the known-label fast path
        (read_audioset_segments(official, "train", None), 1),
        (read_audioset_segments(resaved, "train", classes), 2),
        (read_vggsound_list(full, None), 1),
        (read_vggsound_test_list(test, "test", None), 1),
    ):
        assert parsed.manifest["source"].tolist() == [good]
        assert [p.line for p in parsed.problems] == [bad_line]
        assert f"malformed YouTube id {ytid!r}" in parsed.problems[0].problem


def test_zero_length_segments_are_refused(tmp_path: Path) -> None:
    official = _write(tmp_path / "a.csv", '--PJHxphWEs, 30.000, 30.000, "/m/09x0r"\n--PJHxphWEs, 30, 40, "/m/09x0r"\n')
    resaved = _write(tmp_path / "b.csv", "--PJHxphWEs,30.0,30,/m/09x0r\n--PJHxphWEs,30.0,40.0,/m/09x0r\n")
    for path in (official, resaved):
        for classes in (None, classes_from_labels(["/m/09x0r"])):
            parsed = read_audioset_segments(path, "train", classes)
            assert parsed.manifest["end"].tolist() == [40.0]
            assert [p.line for p in parsed.problems] == [1]
            assert parsed.problems[0].problem.startswith("zero-length segment: start 30")
    user = _write(tmp_path / "mine.csv", USER_HEADER + "a,/a.wav,2.5,2.5,dog,train\nb,/b.wav,2.5,,dog,train\n")
    parsed = read_user_list(user)
    assert parsed.manifest["clip_id"].tolist() == ["b"]
    assert [(p.line, p.problem) for p in parsed.problems] == [
        (2, "zero-length segment: start 2.5 equals end 2.5; give an end after the start")
    ]
    # VGGSound's end is start + 10 s: at a start of 1e20 the 10 s are lost to rounding.
    full = _write(tmp_path / "v.csv", "--PJHxphWEs,1e20,dog,train\n--PJHxphWEs,1e15,dog,train\n")
    parsed = read_vggsound_list(full, None)
    assert parsed.manifest["end"].tolist() == [1e15 + 10]
    assert [p.line for p in parsed.problems] == [1]
    assert "would have no length" in parsed.problems[0].problem


# ---------------------------------------------------------------------------------------
# Combining, problems files, bad fractions


def test_combine_distinct_lists(audioset_classes: pd.DataFrame) -> None:
    train = read_audioset_segments(AUDIOSET_TRAIN, "train", audioset_classes)
    evaluation = read_audioset_segments(AUDIOSET_EVAL, "eval", audioset_classes)
    combined = combine_lists([train, evaluation])
    _check_schema(combined.manifest)
    assert combined.problems == []
    assert combined.rows_read == 50
    assert combined.manifest["split"].value_counts().to_dict() == {"train": 30, "eval": 20}
    assert combined.manifest["clip_id"].iloc[30] == "--4gqARaEJE_000000"
    assert combined.origin["file"].iloc[30] == str(AUDIOSET_EVAL)
    assert combined.origin["line"].iloc[30] == 4


def test_combine_identical_duplicates_are_dropped_and_reported(audioset_classes: pd.DataFrame) -> None:
    once = read_audioset_segments(AUDIOSET_TRAIN, "train", audioset_classes)
    twice = read_audioset_segments(AUDIOSET_TRAIN, "train", audioset_classes)
    for policy in ("error", "first"):
        combined = combine_lists([once, twice], on_duplicate=policy)
        pd.testing.assert_frame_equal(combined.manifest, once.manifest)
        assert combined.rows_read == 60
        assert len(combined.problems) == 30
        first = combined.problems[0]
        assert (first.file, first.line) == (str(AUDIOSET_TRAIN), 4)
        assert first.problem.startswith("duplicate of an identical row: dropped")
        assert "--PJHxphWEs_000030" in first.problem
    # Identical repeats are not malformed rows.
    check_bad_fraction(combined, "both", 0.0)


def test_combine_conflicting_duplicates(audioset_classes: pd.DataFrame) -> None:
    as_train = read_audioset_segments(AUDIOSET_TRAIN, "train", audioset_classes)
    as_eval = read_audioset_segments(AUDIOSET_TRAIN, "eval", audioset_classes)
    with pytest.raises(ListError) as error:
        combine_lists([as_train, as_eval])
    message = str(error.value)
    assert message.startswith("30 clip ids appear more than once with different fields")
    assert "--PJHxphWEs_000030: split 'train' vs 'eval'" in message
    assert "on_duplicate: first" in message
    combined = combine_lists([as_train, as_eval], on_duplicate="first")
    assert combined.manifest["split"].tolist() == ["train"] * 30
    assert len(combined.problems) == 30
    assert combined.problems[0].line == 4
    assert "split 'train' vs 'eval'" in combined.problems[0].problem


def test_combine_duplicates_inside_one_list(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "mine.csv",
        USER_HEADER
        + "a,/a.wav,0,,dog,train\n"  # 2
        + "b,/b.wav,0,,dog,train\n"  # 3
        + "a,/a.wav,0,,cat,train\n"  # 4: same id, other label
        + "b,/b.wav,0,,dog,train\n",  # 5: identical repeat
    )
    parsed = read_user_list(path)
    with pytest.raises(
        ListError,
        match=r"^1 clip id appears more.*a: labels 'dog' vs 'cat' \(\S*mine\.csv line 2 vs \S*mine\.csv line 4\)",
    ):
        combine_lists([parsed])
    combined = combine_lists([parsed], on_duplicate="first")
    assert combined.manifest["clip_id"].tolist() == ["a", "b"]
    assert combined.manifest["labels"].tolist() == ["dog", "dog"]
    assert [(p.file, p.line) for p in combined.problems] == [(str(path), 4), (str(path), 5)]
    assert "labels 'dog' vs 'cat'" in combined.problems[0].problem
    assert combined.problems[1].problem.startswith("duplicate of an identical row")


def test_combine_without_origin_and_bad_policy() -> None:
    manifest = pd.DataFrame(
        {"clip_id": ["x"], "source": ["/x.wav"], "start": [0.0], "end": [math.nan], "labels": ["a"], "split": ["train"]}
    )
    combined = combine_lists([ParsedList(manifest, [], 1), ParsedList(manifest.copy(), [], 1)])
    assert len(combined.manifest) == 1
    assert [(p.file, p.line) for p in combined.problems] == [("<list 2>", 0)]
    with pytest.raises(ValueError, match=r"on_duplicate='last'"):
        combine_lists([], on_duplicate="last")


def test_write_problems(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    write_problems([], empty)
    assert empty.read_text() == "file,line,problem\n"
    path = tmp_path / "sub" / "problems.csv"
    write_problems([ListProblem("a.csv", 7, "unknown label 'x, y'"), ListProblem("b.csv", 0, "duplicate")], path)
    with open(path, newline="") as f:
        assert list(csv.reader(f)) == [
            ["file", "line", "problem"],
            ["a.csv", "7", "unknown label 'x, y'"],
            ["b.csv", "0", "duplicate"],
        ]


def test_check_bad_fraction(tmp_path: Path, audioset_classes: pd.DataFrame, vggsound_classes: pd.DataFrame) -> None:
    path = _write(
        tmp_path / "segments.csv",
        '--PJHxphWEs, 30.000, 40.000, "/m/09x0r"\n'
        '--ZhevVpy1s, 50.000, oops, "/m/012xff"\n'
        '--aE2O5G5WE, 0.000, 10.000, "/m/03fwl"\n'
        '--aO5cdqSAg, 30.000, 40.000, "/t/dd00003"\n',
    )
    parsed = read_audioset_segments(path, "train", audioset_classes)
    check_bad_fraction(parsed, "segments.csv", 0.25)  # 1 of 4 is allowed
    with pytest.raises(ListError) as error:
        check_bad_fraction(parsed, "segments.csv", 0.2)
    assert str(error.value) == (
        "1 of 4 rows of segments.csv could not be parsed (first: line 2: bad end 'oops': not a number); "
        "is the list's `format` right?"
    )
    # VGGSound's test list read as AudioSet: every row is malformed.
    wrong = read_audioset_segments(VGGSOUND_TEST, "test", audioset_classes)
    assert len(wrong.manifest) == 0 and wrong.rows_read == 30
    with pytest.raises(
        ListError, match=r"^30 of 30 rows of test\.csv could not be parsed \(first: line 1: expected 4 fields"
    ):
        check_bad_fraction(wrong, "test.csv", 0.01)
    with pytest.raises(ListError, match=r"no data rows"):
        check_bad_fraction(read_vggsound_list(_write(tmp_path / "empty.csv", "\n"), vggsound_classes), "empty.csv", 0.5)
    with pytest.raises(ValueError, match=r"max_bad_fraction=1\.5"):
        check_bad_fraction(parsed, "segments.csv", 1.5)

"""Zero-shot retrieval (equiav/eval/retrieval.py) on the tiny data set of test_finetune."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from test_finetune import CLASSES, EvalData, build_eval_data

from equiav.cli import main as equiav_main
from equiav.data.inputs import DatasetInputs
from equiav.eval import retrieval as rt
from equiav.model import EquiAV, ModelConfig
from equiav.train.checkpoint import load_export


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> EvalData:
    return build_eval_data(tmp_path_factory.mktemp("retrievaldata"))


def run_main(data: EvalData, out_dir: Path, *extra: str) -> tuple[dict[str, Any], list[str]]:
    out, ids_out = out_dir / "metrics.json", out_dir / "ids.txt"
    code = equiav_main(
        ["retrieval", *data.args("--out", str(out), "--ids-out", str(ids_out), "--device", "cpu"), *extra]
    )
    assert code == 0
    return json.loads(out.read_text()), ids_out.read_text().split()


# --------------------------------------------------------------------------- the subset


def _table(rows: list[tuple[str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["clip_id", "labels"])


def test_per_class_subset_is_deterministic_and_order_free() -> None:
    rows = [(f"clip{k:02d}", CLASSES[k % 3]) for k in range(30)]
    chosen = rt.select_per_class(_table(rows), CLASSES, per_class=4, seed=0)
    assert len(chosen) == 12
    assert rt.select_per_class(_table(rows[::-1]), CLASSES, per_class=4, seed=0) == chosen
    # Ordered by class, then by the seeded key; a different seed picks other clips.
    classes_in_order = [CLASSES.index(dict(rows)[c]) for c in chosen]
    assert classes_in_order == sorted(classes_in_order)
    assert rt.select_per_class(_table(rows), CLASSES, per_class=4, seed=1) != chosen
    # Adding clips of another class does not change this class's choice.
    dog = [c for c in chosen if dict(rows)[c] == CLASSES[0]]
    more = rows + [(f"extra{k}", CLASSES[1]) for k in range(5)]
    assert [
        c for c in rt.select_per_class(_table(more), CLASSES, per_class=4, seed=0) if dict(more)[c] == CLASSES[0]
    ] == dog


def test_a_clip_counts_for_its_first_label_in_class_order() -> None:
    # clip "b" lists cat first, but dog comes first in class order.
    table = _table([("a", CLASSES[1]), ("b", f"{CLASSES[1]};{CLASSES[0]}"), ("c", ""), ("d", CLASSES[2])])
    assert rt.select_per_class(table, CLASSES, per_class=5, seed=0) == ["b", "a", "d"]  # unlabelled "c" left out
    assert rt.select_per_class(table, CLASSES, per_class=0, seed=0) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="'/m/cow'"):
        rt.select_per_class(_table([("x", "/m/cow")]), CLASSES, per_class=1, seed=0)


def test_stable_key_does_not_depend_on_the_process() -> None:
    # A fixed value (published subsets must not change); Python's hash() differs between runs.
    assert rt.stable_key("abc", 0) == 5720521592559513257
    assert rt.stable_key("abc", 0) != rt.stable_key("abc", 1)


def test_id_list_format(tmp_path: Path) -> None:
    path = tmp_path / "ids.txt"
    path.write_text("# MSR-VTT test\nvid1\n\n  vid2  \n")
    assert rt.read_id_list(path) == ["vid1", "vid2"]
    path.write_text("vid1\nvid2\nvid1\n")
    with pytest.raises(ValueError, match="more than once"):
        rt.read_id_list(path)


# --------------------------------------------------------------------------- main()


def test_main_on_the_per_class_subset(data: EvalData, tmp_path: Path) -> None:
    metrics, ids = run_main(
        data, tmp_path / "a", "--split", "test", "--per-class", "2", "--seed", "3", "--batch-size", "4"
    )
    assert len(ids) == 6 and all(i.startswith("test_") for i in ids)
    assert ids == rt.select_per_class(
        pd.read_csv(data.usable, dtype=str, keep_default_na=False).query("split == 'test'"),
        CLASSES,
        per_class=2,
        seed=3,
    )
    assert {"task", "split", "clips", "chance_r5", "v2a", "a2v", "subset_ids_file"} <= set(metrics)
    assert (metrics["task"], metrics["split"], metrics["clips"]) == ("retrieval", "test", 6)
    assert metrics["chance_r5"] == pytest.approx(5 / 6) and metrics["chance_r1"] == pytest.approx(1 / 6)
    assert metrics["subset_ids_file"] == str(tmp_path / "a" / "ids.txt")
    for direction in ("v2a", "a2v"):
        assert set(metrics[direction]) == {"R@1", "R@5", "R@10", "median_rank", "mean_rank"}
        assert metrics[direction]["R@10"] == 1.0  # 6 clips: the true key is always in the top 10
        assert 1 <= metrics[direction]["median_rank"] <= 6
    # Deterministic: the same ids and numbers again, whatever the batch size.
    again, ids_again = run_main(
        data, tmp_path / "b", "--split", "test", "--per-class", "2", "--seed", "3", "--batch-size", "64"
    )
    assert ids_again == ids
    for direction in ("v2a", "a2v"):
        assert again[direction] == pytest.approx(metrics[direction])


def test_matches_agree_with_the_metrics(data: EvalData, tmp_path: Path) -> None:
    matches_csv = tmp_path / "matches.csv"
    metrics, ids = run_main(
        data, tmp_path, "--split", "train", "--per-class", "0", "--matches-out", str(matches_csv),
        "--matches-per-query", "3",
    )  # fmt: skip
    matches = pd.read_csv(matches_csv, dtype={"query_id": str, "match_id": str})
    assert list(matches.columns) == rt.MATCH_COLUMNS
    for direction in ("v2a", "a2v"):
        rows = matches[matches["direction"] == direction]
        assert len(rows) == 3 * len(ids) and set(rows["query_id"]) == set(ids)
        for query, best in rows.groupby("query_id"):
            assert best["rank"].tolist() == [1, 2, 3]
            assert best["similarity"].is_monotonic_decreasing
            true_rank = best["true_rank"].iloc[0]
            # The true key is listed exactly at its rank when that rank is within the list.
            listed = best.loc[best["match_id"] == query, "rank"].tolist()
            assert listed == ([true_rank] if true_rank <= 3 else [])
        per_query = rows.drop_duplicates("query_id")["true_rank"]
        assert (per_query <= 1).mean() == pytest.approx(metrics[direction]["R@1"])
        assert per_query.median() == pytest.approx(metrics[direction]["median_rank"])


def test_all_clips_of_a_split(data: EvalData, tmp_path: Path) -> None:
    metrics, ids = run_main(data, tmp_path, "--split", "train", "--per-class", "0")
    assert metrics["clips"] == 18 and len(ids) == 18 and ids == sorted(ids)


def test_a_user_id_list_is_respected(data: EvalData, tmp_path: Path) -> None:
    id_file = tmp_path / "msrvtt.txt"
    id_file.write_text("# user list\ntrain_005\ntest_007\nnot_downloaded\ntrain_001\n")
    metrics, ids = run_main(data, tmp_path, "--ids", str(id_file))
    assert ids == ["train_005", "test_007", "train_001"]  # the list's order, the missing id left out
    assert (metrics["clips"], metrics["ids_missing"], metrics["split"], metrics["per_class"]) == (3, 1, None, None)
    # --split restricts a user list.
    metrics, ids = run_main(data, tmp_path / "split", "--ids", str(id_file), "--split", "train")
    assert ids == ["train_005", "train_001"] and metrics["ids_missing"] == 2


def test_main_needs_a_split_or_ids(data: EvalData, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--split"):
        equiav_main(["retrieval", *data.args("--out", str(tmp_path / "m.json"), "--ids-out", str(tmp_path / "i.txt"))])


# --------------------------------------------------------------------------- embeddings


def test_centroid_vectors_are_per_clip_and_seeded() -> None:
    audio, visual = rt.draw_centroid_params(5, 16, (64, 32), (32, 32), seed=0)
    assert audio.shape == (5, 16, 24) and visual.shape == (5, 16, 18)
    assert not torch.equal(audio[0], audio[1])  # each clip its own S vectors
    again, _ = rt.draw_centroid_params(5, 16, (64, 32), (32, 32), seed=0)
    assert torch.equal(audio, again)
    assert not torch.equal(rt.draw_centroid_params(5, 16, (64, 32), (32, 32), seed=1)[0], audio)


def test_embeddings_use_the_centroid_of_the_given_vectors(data: EvalData) -> None:
    inputs = DatasetInputs.load(data.usable, data.classes, data.norm)
    dataset = inputs.dataset(["test"], frame="middle")
    weights = load_export(data.pretrained)
    model = EquiAV(ModelConfig.from_dict(weights["model_config"]))
    model.load_state_dict(weights["model"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=5)
    params = rt.draw_centroid_params(len(dataset), 16, (64, 32), (32, 32), seed=0)
    audio, visual = rt.embed_clips(model, loader, *params, torch.device("cpu"))
    assert audio.shape == visual.shape == (13, 64)
    torch.testing.assert_close(audio.norm(dim=1), torch.ones(13))
    # Other centroid vectors, other embeddings: the predictor is in the path.
    other = rt.draw_centroid_params(len(dataset), 16, (64, 32), (32, 32), seed=5)
    audio_other, _ = rt.embed_clips(model, loader, *other, torch.device("cpu"))
    assert not torch.allclose(audio, audio_other)

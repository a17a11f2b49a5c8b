"""equiav.eval.summary: one row per metric, naming the run's starting point."""

from __future__ import annotations

import json

import pytest

from equiav.eval.summary import summary_markdown, summary_rows


def _metrics(tmp_path, run: str, **data) -> str:
    path = tmp_path / run / "metrics.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    return str(path)


def test_every_metric_names_its_run_and_starting_point(tmp_path):
    recall = {"R@1": 0.1, "R@5": 0.3, "R@10": 0.5}
    files = [
        _metrics(tmp_path, "esc50_audio-released", task="finetune", modality="audio", metric="accuracy",
                 value=0.5, chance=0.02, start={"run": "released", "type": "release"}),
        # Written before starting points were recorded: the model's folder names the run.
        _metrics(tmp_path, "vggsound", task="retrieval", v2a=recall, a2v=recall, chance_r1=0.01,
                 chance_r5=0.05, chance_r10=0.1, pretrained="results/pretrain/audioset/model.pt"),
    ]  # fmt: skip
    table = summary_rows(files)
    assert len(table) == 1 + 6
    assert table.groupby("run")["start"].unique().to_dict() == {
        "esc50_audio-released": ["released"],
        "vggsound": ["audioset"],
    }
    assert table.loc[0, "x_chance"] == pytest.approx(25.0)
    text = summary_markdown(table)
    assert "| esc50_audio-released | released | finetune | audio accuracy | 0.500 | 0.020 | 25.0 |" in text
    assert "| vggsound | audioset | retrieval | a2v R@10 | 0.500 | 0.100 | 5.0 |" in text


def test_an_unknown_task_names_the_file(tmp_path):
    path = _metrics(tmp_path, "odd", task="probe")
    with pytest.raises(ValueError, match=r"odd/metrics\.json: unknown task 'probe'"):
        summary_rows([path])

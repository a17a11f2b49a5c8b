"""The `equiav` command tree (equiav/cli.py, equiav/options.py): one parser, every command's help,
shared option names, and logging set up for every command, the delegated stages included."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_finetune import SMOKE, EvalData, build_eval_data

from equiav import cli
from equiav.options import read_settings, resolve_device

REPO = Path(__file__).resolve().parents[1]
USER_COMMANDS = ("embed", "retrieve", "validate-config", "transient", "tables", "report")
STAGES = ("demo-data", "fetch", "fetch-archive", "catalog", "manifest", "check-splits", "download", "features",
          "availability", "norm-stats", "pretrain", "import-model", "finetune", "retrieval", "summary", "launch")  # fmt: skip
REPORT_KINDS = ("page", "curves", "finetune-curves", "retrieval-examples", "qualitative")
INFO = re.compile(r"^\S+ \S+ INFO (equiav[\w.]*): (.*)$", re.MULTILINE)


def equiav(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python -m equiav ARGS`` in a process of its own (its own logging set-up, as in a rule)."""
    return subprocess.run([sys.executable, "-m", "equiav", *args], cwd=cwd, capture_output=True, text=True, check=False)


def info_lines(stderr: str) -> list[tuple[str, str]]:
    return INFO.findall(stderr)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def _leaf_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser, ``report``'s kinds as ``report page`` and so on."""
    leaves = {}
    for name, p in _subparsers(cli.build_parser()).items():
        nested = _subparsers(p)
        leaves.update({f"{name} {kind}": q for kind, q in nested.items()} if nested else {name: p})
    return leaves


# --------------------------------------------------------------------------- the tree and its help


def test_the_tree_has_every_command_in_its_group() -> None:
    assert set(cli.COMMANDS) == set(USER_COMMANDS) | set(STAGES) == set(cli.ORDER)
    assert {n for n, c in cli.COMMANDS.items() if c.group == cli.USER} == set(USER_COMMANDS)


def test_top_level_help_lists_user_commands_apart_from_the_stages(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    user, stages = text.index("user commands:"), text.index("workflow stages")
    assert user < stages
    listed = {m.group(1): m.start() for m in re.finditer(r"^  ([a-z][\w-]+)  ", text, re.MULTILINE)}
    assert all(user < listed[name] < stages for name in USER_COMMANDS)
    assert all(stages < listed[name] for name in STAGES)
    assert "-v, --verbose" in text and "-q, --quiet" in text
    assert "equiav." not in text  # commands, not module paths


@pytest.mark.parametrize("name", [*USER_COMMANDS, *STAGES, *(f"report {k}" for k in REPORT_KINDS)])
def test_every_command_has_its_help_after_the_verbosity_flag(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["-v", *name.split(), "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: equiav {name} ")
    assert "python -m" not in out and "Stage " not in out


def test_every_option_has_help_and_shows_its_default() -> None:
    problems = []
    for name, p in _leaf_parsers().items():
        text = " ".join(p.format_help().split())
        for action in p._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            label = f"equiav {name} {'/'.join(action.option_strings) or action.dest}"
            if not action.help:
                problems.append(f"{label}: no help text")
            shown = action.option_strings and not action.required and action.nargs != 0
            if shown and action.default is not None and f"(default: {action.default})" not in text:
                problems.append(f"{label}: default {action.default!r} not shown")
    assert not problems, "\n".join(problems)


def test_the_same_things_have_the_same_names() -> None:
    leaves = _leaf_parsers()
    options = {name: {o for a in p._actions for o in a.option_strings if a.help != argparse.SUPPRESS}
               for name, p in leaves.items()}  # fmt: skip
    model_files = {"embed", "retrieve", "finetune", "retrieval", "report qualitative"}
    assert all("--pretrained" in options[n] for n in model_files)
    assert not any({"--checkpoint", "--num-workers"} & opts for opts in options.values())
    assert {n for n, opts in options.items() if "--workers" in opts} == {"embed", "retrieve", "retrieval"}
    devices = {n: a.default for n, p in leaves.items() for a in p._actions if "--device" in a.option_strings}
    assert devices == dict.fromkeys(("embed", "retrieve", "retrieval", "report qualitative"), "auto")
    settings = {n for n, p in leaves.items() for a in p._actions if "--settings" in a.option_strings}
    assert settings == {
        "demo-data",
        "manifest",
        "download",
        "features",
        "norm-stats",
        "pretrain",
        "import-model",
        "finetune",
    }
    assert all(a.type is read_settings for p in leaves.values() for a in p._actions if a.dest == "settings")


def test_the_old_model_option_of_embed_still_works_unlisted(tmp_path: Path) -> None:
    parser = cli.build_parser(["embed"])
    args = parser.parse_args(["embed", "clip.mp4", "--checkpoint", "model.pt", "--out", "e.npz"])
    assert args.pretrained == "model.pt" and args.device == "auto" and args.workers == 1
    assert "--checkpoint" not in _subparsers(parser)["embed"].format_help()


def test_settings_take_json_text_or_a_json_file(tmp_path: Path) -> None:
    assert read_settings('{"recipe": "esc50"}') == {"recipe": "esc50"}
    path = tmp_path / "s.json"
    path.write_text('{"epochs": 2}')
    assert read_settings(str(path)) == {"epochs": 2}
    with pytest.raises(argparse.ArgumentTypeError, match="neither a JSON object nor a file"):
        read_settings(str(tmp_path / "missing.json"))
    with pytest.raises(argparse.ArgumentTypeError, match="not valid JSON"):
        read_settings("{recipe: esc50}")
    with pytest.raises(argparse.ArgumentTypeError, match="must be a JSON object"):
        read_settings("[1, 2]")


def test_device_auto_is_cuda_when_available_else_cpu() -> None:
    import torch

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(SystemExit, match="not a torch device"):
        resolve_device("gpu0")


# --------------------------------------------------------------------------- logging of every command


def test_tables_logs_its_files_and_quiet_silences_it(tmp_path: Path) -> None:
    # A data-only run (no metrics file at all): the main tables with the paper's numbers.
    out = tmp_path / "tables"
    proc = equiav("-v", "tables", "--metrics", "--availability", "--out-dir", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = info_lines(proc.stderr)
    assert any(name == "equiav.eval.tables" and "tables.md" in text and "table1" in text for name, text in lines)
    assert any(text.startswith("table1: ") and "table1.csv" in text for _, text in lines), proc.stderr
    quiet = equiav("-q", "tables", "--metrics", "--availability", "--out-dir", str(out))
    assert quiet.returncode == 0 and " INFO " not in quiet.stderr


def test_launch_passes_the_verbosity_on(tmp_path: Path) -> None:
    args = ("launch", "--", "tables", "--metrics", "--availability", "--out-dir", str(tmp_path))
    assert info_lines(equiav(*args).stderr)
    quiet = equiav("-q", *args)
    assert quiet.returncode == 0 and " INFO " not in quiet.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> EvalData:
    return build_eval_data(tmp_path_factory.mktemp("clidata"))


def test_finetune_through_launch_logs_its_epochs_and_metric(data: EvalData, tmp_path: Path) -> None:
    """As the rule runs it: `equiav launch -- finetune ...` with stderr as the log; settings in a file."""
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({**SMOKE, "modality": "audio", "train_splits": ["train"], "eval_splits": ["test"]}))
    out = tmp_path / "metrics.json"
    proc = equiav("launch", "--gpus", "0", "--", "finetune", "--settings", str(settings),
                  *data.args("--out", str(out), "--work-dir", str(tmp_path / "work")))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    texts = [text for name, text in info_lines(proc.stderr) if name == "equiav.train.finetune"]
    assert any("fine-tuning audio" in t for t in texts), proc.stderr
    metrics = json.loads(out.read_text())
    epochs = [t for t in texts if re.match(rf"run epoch \d+: {metrics['metric']} [\d.]+ \(chance ", t)]
    assert len(epochs) == SMOKE["epochs"], proc.stderr
    assert any(t.startswith(f"{metrics['metric']} = {metrics['value']:.4f}") and str(out) in t for t in texts)

    again = equiav("finetune", "--settings", settings.read_text(),
                   *data.args("--out", str(out), "--work-dir", str(tmp_path / "work")))  # fmt: skip
    assert again.returncode == 0 and "already finished" in again.stderr


def test_retrieval_logs_its_recalls(data: EvalData, tmp_path: Path) -> None:
    proc = equiav("retrieval", *data.args("--split", "test", "--per-class", "2", "--samples", "2",
                                          "--out", str(tmp_path / "m.json"), "--ids-out", str(tmp_path / "ids.txt")))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    texts = [text for name, text in info_lines(proc.stderr) if name == "equiav.eval.retrieval"]
    assert any(t.startswith("embedding 6 clips (split test)") for t in texts), proc.stderr
    assert any(re.match(r"6 clips: V2A R@1/5/10 [\d.]+/[\d.]+/[\d.]+, A2V ", t) for t in texts), proc.stderr


def test_a_bad_option_names_the_command() -> None:
    proc = equiav("retrieval", "--num-workers", "2")
    assert proc.returncode == 2 and "usage: equiav retrieval" in proc.stderr

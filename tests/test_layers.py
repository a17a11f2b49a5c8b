"""The package's house rules, checked on its source: imports run one way through the layers
(settings -> data -> model -> train -> eval -> cli) with no cycle among modules, the workflow's
parse imports no torch, and a long module says why it is kept whole."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "equiav"

# Lowest first; a module may import its own layer and those below it. Matched by prefix, the
# longest first.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("settings", ("equiav.settings", "equiav.atomic", "equiav.options")),
    ("data", ("equiav.data",)),
    ("model", ("equiav.model", "equiav.augment", "equiav.losses", "equiav.metrics", "equiav.distributed")),
    ("train", ("equiav.train",)),
    ("eval", ("equiav.eval", "equiav.embed")),
    ("cli", ("equiav.config", "equiav.launch", "equiav.cli", "equiav.embed_commands", "equiav.__main__", "equiav")),
]
LONG_MODULE = 550  # lines: "about 500"
KEPT_WHOLE = "Kept whole:"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every equiav module ``name`` imports, at the top or inside a function (a lazy import is
    still a dependency). ``from equiav.x import y`` counts equiav.x.y when that is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
            targets = submodules if len(submodules) == len(node.names) else [base, *submodules]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> int:
    matches = [
        (len(prefix), index)
        for index, (_, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    assert matches, f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}"
    return max(matches)[1]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def test_the_import_graph_is_read_from_the_source() -> None:
    graph = _graph()
    # Known edges of each kind: top level, relative-free `from x import module`, lazy (in a function).
    assert "equiav.settings.model" in graph["equiav.model.encoders"]
    assert "equiav.data.store" in graph["equiav.train.data"]
    assert "equiav.data.features" in graph["equiav.cli"]  # imported inside a sub-command's function


def test_no_import_cycle_among_the_modules() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_imports_run_down_the_layers() -> None:
    graph = _graph()
    upward = [
        f"{module} ({LAYERS[_layer(module)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_the_checker_sees_a_cycle_and_an_upward_import() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _layer("equiav.data.lists") < _layer("equiav.train.finetune") < _layer("equiav.cli")
    assert _layer("equiav.settings.pretrain") == 0 and _layer("equiav.embed") == _layer("equiav.eval.tables")


def _imported_modules(argv: list[str], tmp_path: Path) -> set[str]:
    """The modules a command imports, read from ``python -X importtime``."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    result = subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize(
    "what",
    ["snakefile", "validate-config"],
)
def test_checking_a_configuration_imports_no_torch(what: str, tmp_path: Path) -> None:
    """The Snakefile's parse (every job parses it again) and `equiav validate-config` check every
    run's settings without torch: seconds saved per job, and the check works where torch is not
    installed yet. A paper preset is used so that pre-training and fine-tuning runs are checked."""
    preset = REPO / "workflow" / "presets" / "audioset_20k.yaml"
    if what == "snakefile":
        argv = ["-m", "snakemake", "-s", str(REPO / "Snakefile"), "--configfile", str(preset), "-n", "-q"]
        argv += ["--directory", str(tmp_path)]
    else:
        argv = ["-m", "equiav", "validate-config", str(preset)]
    modules = _imported_modules(argv, tmp_path)
    assert "equiav.config" in modules and "equiav.settings.pretrain" in modules
    heavy = sorted(m for m in modules if m.split(".")[0] in ("torch", "torchaudio", "torchvision", "timm"))
    assert not heavy, f"importing {heavy[:5]}"


def test_a_long_module_says_why_it_is_kept_whole() -> None:
    unexplained = []
    for name, path in sorted(_modules().items()):
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > LONG_MODULE and KEPT_WHOLE not in (ast.get_docstring(ast.parse(text)) or ""):
            unexplained.append(f"{name} ({lines} lines)")
    assert not unexplained, (
        f"modules over {LONG_MODULE} lines without a '{KEPT_WHOLE} <reason>' paragraph in their docstring "
        f"(split them, or say why not): {', '.join(unexplained)}"
    )

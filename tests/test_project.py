"""dvc.yaml as the one definition of the stages, and a flow run's inputs written where DVC reads them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from evaclip import project
from evaclip.config import PROFILES_DIR, load_params, profile_path
from evaclip.errors import ConfigError

from .conftest import REPO

# What each stage's command runs (bin/evaclip VERB -> evaclip/cli.py, which imports these lazily).
STAGE_ENTRIES = {
    "prepare": ["evaclip.data.prepare"],
    "pretrain": ["evaclip.pretrain.worker", "evaclip.train.launch", "evaclip.tracking.live"],
    "init": ["evaclip.init"],
    "train": ["evaclip.train.worker", "evaclip.train.launch", "evaclip.tracking.live"],
    "evaluate": ["evaclip.eval", "evaclip.tracking"],
}


def _module_file(name: str) -> Path | None:
    path = REPO / Path(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imports(name: str) -> set[str]:
    """Every evaclip module `name` imports, at the top or inside a function (lazy imports run too)."""
    file = _module_file(name)
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return {m for m in found if m.startswith("evaclip") and _module_file(m)}


def _closure(entries: list[str]) -> set[str]:
    seen, todo = set(), list(entries)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            parts = name.split(".")
            todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
            todo += _imports(name)
    return {str(_module_file(m).relative_to(REPO)) for m in seen}


@pytest.mark.parametrize("stage", list(STAGE_ENTRIES))
def test_every_module_a_stage_runs_is_one_of_its_dvc_deps(stage):
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["deps"]
    code = [d for d in deps if d.startswith("evaclip")]
    missing = sorted(f for f in _closure(STAGE_ENTRIES[stage])
                     if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in code))
    assert not missing, f"dvc.yaml's {stage} stage runs these modules but does not list them as deps: {missing}"


def test_the_library_imports_neither_prefect_nor_the_flows():
    for file in (REPO / "evaclip").rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] in ("prefect", "flows")], file


def test_data_dvc_imports_the_demo_source_so_a_fresh_clone_can_reproduce_it():
    stage = yaml.safe_load((REPO / "data.dvc").read_text())
    assert stage["deps"][0]["path"] == "/usr/share/datasets/fashion-mnist" and stage["outs"][0]["path"] == "data"
    assert not stage.get("frozen")  # `dvc repro` imports it again when data/ is missing
    assert load_params(REPO / "params.yaml").data.path == "data"


def _project(tmp_path: Path) -> Path:
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    return tmp_path


def test_a_run_writes_only_its_overrides_into_params_yaml_and_the_next_run_starts_from_the_users_file(tmp_path):
    root = _project(tmp_path)
    original = (root / "params.yaml").read_text()
    project.run_params(root, ["train.steps=40", "eval.sets=[x/y]"])
    written = (root / "params.yaml").read_text()
    assert load_params(root / "params.yaml").train.steps == 40
    changed = [line for line in written.splitlines() if line not in original.splitlines()]
    assert [line.split("#")[0].strip() for line in changed] == ["steps: 40", "sets:", "- x/y"]
    assert "# FLIP: drop half of the image tokens" in written  # the user's comments stay

    project.run_params(root, [])  # the next run without overrides: the file the last run started from
    assert (root / "params.yaml").read_text() == original

    edited = original.replace("  seed: 0\n", "  seed: 7\n", 1)
    (root / "params.yaml").write_text(edited)
    project.run_params(root, ["train.steps=40"])
    project.run_params(root, [])  # the user edited the file after that run: their edit is the base now
    assert (root / "params.yaml").read_text() == edited


def test_a_bad_override_names_the_key_and_leaves_params_yaml_alone(tmp_path):
    root = _project(tmp_path)
    original = (root / "params.yaml").read_text()
    with pytest.raises(ConfigError, match="train.stepz"):
        project.run_params(root, ["train.stepz=3"])
    assert (root / "params.yaml").read_text() == original


def test_outside_a_project_the_error_says_where_to_run(tmp_path, monkeypatch):
    monkeypatch.delenv("EVACLIP_HOME", raising=False)
    with pytest.raises(ConfigError, match="is not inside an evaclip project"):
        project.require_root(tmp_path)


@pytest.mark.parametrize("profile", sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
def test_every_profile_holds_every_parameter_dvc_yaml_names(profile):
    """`evaclip config use` copies a profile to params.yaml as written: DVC refuses a stage whose params are missing."""
    raw = yaml.safe_load(profile_path(profile).read_text())
    missing = []
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        for key in stage.get("params", []):
            node = raw
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    missing.append(key)
                    break
                node = node[part]
    assert not missing, f"{profile}: {sorted(set(missing))}"

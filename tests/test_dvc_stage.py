"""`dvc repro` runs the same `evaclip` verbs as users do, in a real git + DVC repository.

The whole pipeline under `dvc repro` (every stage, a changed parameter rerunning only what it touches, `dvc
metrics show`) is tested in tests/test_flows.py, whose flow runs each stage through DVC; here, one stage alone.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess

from .conftest import BIN, make_project, sh
from .test_data import image_folder


def _run(args, cwd):
    return sh(args, cwd, env={"OMP_NUM_THREADS": "1"})


def test_dvc_repro_runs_init_once_and_again_only_when_its_params_change(tmp_path):
    source = image_folder(tmp_path / "source", per_class=2)
    project = make_project(tmp_path / "project", ["data.source=image_folder", f"data.path={source}",
                                                  "data.samples_per_shard=4"])
    # No virtualenv activated, nothing of it on PATH: the stages' bin/evaclip finds the project's .venv.
    bare = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    bare["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    result = subprocess.run([str(BIN / "dvc"), "repro", "init"], cwd=project, env=bare, capture_output=True, text=True)
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert "Running stage 'prepare'" in out and "Running stage 'pretrain'" in out  # upstream of init
    assert "pretrain.teacher is not set" in out
    checkpoint = project / "outputs/init/model.safetensors"
    assert checkpoint.is_file() and (project / "outputs/init/init_report.json").is_file()
    first = checkpoint.read_bytes()

    assert "didn't change" in _run(["dvc", "repro", "init"], project)

    params = project / "params.yaml"
    params.write_text(params.read_text().replace("  seed: 0\n", "  seed: 1\n", 1))  # init.seed
    assert "Running stage 'init'" in _run(["dvc", "repro", "init"], project)
    assert checkpoint.read_bytes() != first
    assert "init.seed" in _run(["dvc", "params", "diff"], project)


def test_a_flow_runs_an_evaclip_stage_in_its_own_process_and_dvc_records_it_as_dvc_repro_would(tmp_path):
    import pytest

    from evaclip import project as evaclip_project
    from evaclip.cli import invoke
    from evaclip.errors import EvaclipError

    source = image_folder(tmp_path / "source", per_class=2)
    project = make_project(tmp_path / "project", ["data.source=image_folder", f"data.path={source}",
                                                  "data.samples_per_shard=4"])
    lines: list[str] = []
    assert evaclip_project.runs_project_code(project)  # a copy of the code loaded here: the verb runs in-process
    assert evaclip_project.reproduce(project, "prepare", on_output=lines.append, run_verb=invoke)
    assert any("samples in" in line for line in lines)  # the verb's own output, line by line
    assert not evaclip_project.changed(project, "prepare")  # `dvc status` (its own process) finds it recorded
    assert not evaclip_project.reproduce(project, "prepare", on_output=lines.append, run_verb=invoke)

    # The project's code differs from the code loaded here: DVC runs the command in a process of its own.
    module = project / "evaclip" / "data" / "prepare.py"
    original = module.read_text()
    module.write_text(original + "\n# edited\n")
    assert not evaclip_project.runs_project_code(project)
    lines.clear()
    assert evaclip_project.reproduce(project, "prepare", on_output=lines.append, run_verb=invoke)
    assert any("samples in" in line for line in lines) and not evaclip_project.changed(project, "prepare")

    # Back to the first inputs: DVC's run cache restores the outputs they made, without running the verb.
    module.write_text(original)
    lines.clear()
    assert evaclip_project.reproduce(project, "prepare", on_output=lines.append, run_verb=invoke)
    assert not any("samples in" in line for line in lines)
    assert (project / "outputs/data/train/manifest.json").is_file() and not evaclip_project.changed(project, "prepare")

    # The verb's own error, raised to the caller; dvc.lock keeps the last run's record.
    lock = (project / "dvc.lock").read_text()
    params = project / "params.yaml"
    params.write_text(params.read_text().replace(str(source), str(tmp_path / "missing")))
    with pytest.raises(EvaclipError, match="missing") as error:
        evaclip_project.reproduce(project, "prepare", on_output=lines.append, run_verb=invoke)
    assert "dvc repro" not in str(error.value)
    assert (project / "dvc.lock").read_text() == lock

    # The CLI's consoles follow sys.stdout again (a CliRunner's, a terminal's), not the stage's log.
    from evaclip.cli import out

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        out.print("after the stage")
    assert "after the stage" in buffer.getvalue()

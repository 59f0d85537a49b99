"""The project: a git + DVC repository whose `dvc.yaml` defines the stages and `params.yaml` their inputs.

`dvc.yaml` is the only record of what a stage runs, depends on and produces; `dvc.lock` the only record
of what ran. Everything that runs stages (the Prefect flow, `dvc repro`, a user) goes through DVC, so
they all agree about what is current.

Stages run through DVC's Python API in this process (`reproduce`), with the project as the working directory
for the call (the API resolves paths against it); the other DVC commands run as `dvc` processes in the project.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import yaml
from filelock import FileLock

from .config import load_params
from .errors import ConfigError, EvaclipError

# Runs `evaclip ARGV` in this process, its output line by line to the callable (evaclip.cli.invoke).
RunVerb = Callable[[list[str], Callable[[str], None]], None]

# What a flow run wrote into params.yaml, and the text it started from (see `run_params`).
RUN_PARAMS_RECORD = Path(".dvc/tmp/evaclip-run-params.json")


def find_root(start: Optional[Path] = None) -> Optional[Path]:
    """The project (the folder holding `.dvc/` and `dvc.yaml`) containing `start`, if any."""
    start = Path(start or os.environ.get("EVACLIP_HOME") or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def require_root(start: Optional[Path] = None) -> Path:
    root = find_root(start)
    if root is None or not (root / "dvc.yaml").is_file():
        raise ConfigError(f"{Path(start or Path.cwd()).resolve()} is not inside an evaclip project "
                          "(a git + DVC repository with dvc.yaml): run from the project's folder or set EVACLIP_HOME")
    return root


def dvc(args: list[str], root: Path, on_output: Optional[Callable[[str], None]] = None,
        env: Optional[dict] = None) -> str:
    """Run `dvc ARGS` in `root`; its output line by line to `on_output` (a flow's logger), and returned."""
    bin_dir = str(Path(sys.executable).parent)  # stages run `bin/evaclip`, which finds the venv itself
    process_env = dict(os.environ, DVC_NO_ANALYTICS="1", **(env or {}))
    process_env["PATH"] = f"{bin_dir}{os.pathsep}{process_env.get('PATH', '')}"
    lines = []
    with subprocess.Popen([sys.executable, "-m", "dvc", *args], cwd=root, env=process_env, text=True, bufsize=1,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
        try:
            for line in process.stdout:
                lines.append(line)
                if on_output:
                    on_output(line.rstrip())
        except BaseException:  # stopped (a cancelled flow run): the training's last lines, its checkpoint, still count
            _drain(process, lines, on_output, seconds=25)
            raise
    output = "".join(lines)
    if process.returncode != 0:
        raise EvaclipError(f"`dvc {' '.join(args)}` failed in {root}:\n{output.strip()[-4000:]}")
    return output


def _drain(process: subprocess.Popen, lines: list[str], on_output, seconds: float) -> None:
    """Keep reading what the stopping stage writes, for at most `seconds`: a closed pipe would make its
    processes fail while they save."""
    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            try:
                if on_output:
                    on_output(line.rstrip())
            except Exception:  # noqa: BLE001 - the logger of a run being torn down
                pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(seconds)


@contextmanager
def exclusive(root: Path) -> Iterator[None]:
    """One pipeline run per project at a time: two would rewrite params.yaml under each other."""
    (root / ".dvc" / "tmp").mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".dvc" / "tmp" / "evaclip-pipeline.lock")):
        yield


def stages(root: Path) -> dict[str, str]:
    """name -> DVC target, in the order they run: the source data's .dvc file, then dvc.yaml's stages."""
    targets = {"data": "data.dvc"} if (root / "data.dvc").is_file() else {}
    for name in yaml.safe_load((root / "dvc.yaml").read_text())["stages"]:
        targets[name] = name
    return targets


def changed(root: Path, stage: str) -> bool:
    """Whether `dvc repro` would run `stage` (its deps, params or outputs differ from dvc.lock)."""
    # stdout alone: DVC's warnings (after a run that was stopped, say) go to stderr and are not JSON.
    result = subprocess.run([sys.executable, "-m", "dvc", "status", "--json", stage], cwd=root, text=True,
                            capture_output=True, env=dict(os.environ, DVC_NO_ANALYTICS="1"))
    try:
        if result.returncode == 0:
            return bool(json.loads(result.stdout or "{}"))
    except json.JSONDecodeError:
        pass
    raise EvaclipError(f"`dvc status --json {stage}` failed in {root} (exit code {result.returncode}):\n"
                       f"{(result.stdout + result.stderr).strip()[-4000:]}")


def reproduce(root: Path, stage: str, force: bool = False, on_output: Optional[Callable[[str], None]] = None,
              env: Optional[dict] = None, run_verb: Optional[RunVerb] = None) -> bool:
    """`dvc repro --single-item STAGE`; returns whether the stage ran. `env` is set for its command.

    DVC decides, through its Python API in this process, whether the stage changed (or `force`). A command that
    is an evaclip verb (`bin/evaclip VERB ...`, every stage of ours) then runs here through `run_verb(ARGV,
    on_output)` (`evaclip.cli.invoke`, which the flows pass), when this process's evaclip is the project's own
    code; DVC's API removes the outputs
    first, restores them from its run cache instead when these inputs ran before, and records the run in
    dvc.lock and its cache, as `dvc repro` does. Three processes per stage (dvc status, dvc repro, the verb,
    each importing DVC or torch again) cost ~7 s per stage on 2 cores. Anything else (another command,
    data.dvc's import, a project whose evaclip/ differs from the code loaded here) runs as `dvc repro -q
    --single-item STAGE`, its output piped to `on_output` as well.
    """
    from dvc.repo import Repo, lock_repo

    with contextlib.chdir(root), _environment(env or {}):
        with Repo(str(root)) as repo:
            with lock_repo(repo):
                (target,) = repo.stage.collect(stage)
                if not force and not target.changed():
                    return False
                verb = evaclip_verb(target.cmd) if run_verb and not target.frozen and runs_project_code(root) else None
            if verb is not None:
                _reproduce_here(repo, target, lambda: run_verb(verb, on_output or print), force)
                return True
        # -q: the stage command's own output only, without DVC's hints (git add dvc.lock, dvc push...)
        dvc(["repro", "-q", "--single-item", *(["--force"] if force else []), stage], root, on_output)
    return True


def _reproduce_here(repo, target, run: Callable[[], None], force: bool) -> None:
    """What `dvc repro` does for a changed stage (dvc/stage/__init__.py `Stage.run`), the command run in-process."""
    from dvc.repo import lock_repo
    from dvc.stage.cache import RunCacheNotFoundError

    with lock_repo(repo):
        target.remove_outs(ignore_remove=False, force=False)
        try:
            if force:
                raise RunCacheNotFoundError(target)
            repo.stage_cache.restore(target)
            restored = True
        except RunCacheNotFoundError:
            restored = False
    if not restored:  # without DVC's lock, as `dvc repro` runs a command: `dvc status` may look meanwhile
        run()
    with lock_repo(repo):
        cached = all(out.use_cache for out in target.outs if not (out.is_metric or out.is_plot))
        target.save(run_cache=cached)
        target.commit()
        target.dump(update_pipeline=False)


def evaclip_verb(cmd: Any) -> Optional[list[str]]:
    """The arguments of a stage command that runs the evaclip CLI (`bin/evaclip VERB ...`), else None."""
    import shlex

    if not isinstance(cmd, str) or any(c in cmd for c in ";&|<>$`\n"):
        return None
    words = shlex.split(cmd)
    return words[1:] if words and words[0] in ("bin/evaclip", "evaclip") else None


def runs_project_code(root: Path) -> bool:
    """Whether the evaclip package loaded here is the project's evaclip/: the same folder, or the same files.

    Otherwise a stage run in this process would run other code than the code dvc.lock records for it.
    """
    import evaclip

    here, there = Path(evaclip.__file__).parent.resolve(), (root / "evaclip").resolve()
    if here == there:
        return True

    def files(folder: Path) -> dict[Path, Path]:
        return {p.relative_to(folder): p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts}

    ours, theirs = files(here), files(there)
    return ours.keys() == theirs.keys() and all(ours[k].read_bytes() == theirs[k].read_bytes() for k in ours)


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def save_experiment(root: Path, name: str) -> str:
    """Record the workspace (params.yaml, dvc.lock, code) as a DVC experiment; returns its git commit.

    `dvc exp apply NAME` brings it back and `dvc repro` (or `dvc pull`) rebuilds its outputs. DVC's API in this
    process: `dvc exp save --force --include-untracked dvc.lock -n NAME` without a process importing DVC again.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(str(root)) as repo:
        try:
            return repo.experiments.save(name=name, force=True, include_untracked=["dvc.lock"]) or ""
        except DvcException as error:
            raise EvaclipError(f"`dvc exp save -n {name}` failed in {root}: {error}") from error


def push(root: Path, remote: Optional[str] = None, attempts: int = 5,
         on_retry: Optional[Callable[[int, str], None]] = None) -> None:
    """Every stage's cached outputs (and the imported data) to the DVC remote, if the project has one.

    A remote that stops answering part-way (a restarting S3 server) gets `attempts` tries, 2, 4, 8 .. s apart:
    `dvc push` sends only what the remote lacks, so a retry finishes the transfer. `on_retry(attempt, error)`.
    """
    from dvc.repo import Repo

    with Repo(str(root)) as repo:  # what `dvc remote list` lists: every config level's remotes
        remotes = list(repo.config.get("remote", {}))
    if not (remote or remotes):
        return
    for attempt in range(1, attempts + 1):
        try:
            dvc(["push", *(["-r", remote] if remote else [])], root)
            return
        except EvaclipError as error:
            if attempt == attempts:
                raise
            if on_retry:
                on_retry(attempt, str(error))
            time.sleep(2 ** attempt)


def lock_digests(root: Path) -> dict[str, str]:
    """Digests of what dvc.lock recorded: the data (imports and data deps), the parameters, the code."""
    lock = yaml.safe_load((root / "dvc.lock").read_text()) if (root / "dvc.lock").is_file() else {}
    parts: dict[str, dict] = {"data": {}, "params": {}, "code": {}}
    for name, stage in sorted((lock or {}).get("stages", {}).items()):
        for dep in stage.get("deps", []):
            kind = "code" if dep["path"].startswith(("evaclip", "bin/")) else "data"
            parts[kind][dep["path"]] = dep.get("md5")
        parts["params"][name] = stage.get("params", {})
    if (root / "data.dvc").is_file():
        parts["data"]["data.dvc"] = (yaml.safe_load((root / "data.dvc").read_text())["outs"][0]).get("md5")
    return {f"dvc.lock.{kind}": _digest(value)[:16] for kind, value in parts.items()}


def data_version(root: Optional[Path], params) -> Optional[str]:
    """The md5 that dvc.lock recorded for the prepared shards (else data.dvc's, for the source data)."""
    if root is None:
        return None
    lock = yaml.safe_load((root / "dvc.lock").read_text()) if (root / "dvc.lock").is_file() else {}
    prepared = ((lock or {}).get("stages", {}).get("prepare") or {}).get("outs") or []
    if prepared and Path(prepared[0]["path"]) == Path(params.data.output_dir):
        return prepared[0].get("md5")
    file = root / "data.dvc"
    return (yaml.safe_load(file.read_text())["outs"][0]).get("md5") if file.is_file() else None


# --- A flow run's inputs, written where DVC reads them ---------------------------------------------------

def run_params(root: Path, overrides: list[str], base_file: Optional[Path] = None) -> Path:
    """Write params.yaml for this run: its base plus `overrides`; returns its path.

    The base is `base_file` (a profile), else params.yaml as the user left it: after a run that wrote
    overrides into it, the next run starts from the text that run started from, unless the user edited the
    file since. Only values that differ are written (comments and layout kept), so dvc.lock records the run's
    real inputs and `dvc params diff` shows them.
    """
    target = root / "params.yaml"
    record_file = root / RUN_PARAMS_RECORD
    current = target.read_text() if target.is_file() else ""
    base = Path(base_file).read_text() if base_file else current
    if base_file is None and record_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("written") == _digest(current):
            base = record["base"]
    text = with_overrides(base, overrides, target)
    if text != current:
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)
    record_file.parent.mkdir(parents=True, exist_ok=True)
    record_file.write_text(json.dumps({"written": _digest(text), "base": base}))
    return target


def with_overrides(text: str, overrides: list[str], where: Path) -> str:
    """`text` (a params file) with the values that `overrides` change, validated, comments kept."""
    from ruamel.yaml import YAML

    tmp = where.with_name(f".{where.name}.base")
    tmp.write_text(text)
    try:
        before = load_params(tmp).model_dump(mode="json")
        after = load_params(tmp, overrides).model_dump(mode="json")  # names a bad key or value
    finally:
        tmp.unlink(missing_ok=True)
    if before == after:
        return text
    yml = YAML()
    yml.indent(mapping=2, sequence=4, offset=2)
    yml.width = 4096
    yml.preserve_quotes = True
    yml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    document = yml.load(text) or {}
    _set_changed(document, before, after)
    stream = io.StringIO()
    yml.dump(document, stream)
    return stream.getvalue()


def _set_changed(document: Any, before: dict, after: dict) -> None:
    for key, value in after.items():
        if before.get(key) == value:
            continue  # unchanged, whether or not the file spells it out
        if isinstance(value, dict) and isinstance(before.get(key), dict):
            if key not in document:
                document[key] = {}
            _set_changed(document[key], before[key], value)
        elif before.get(key) != value:
            document[key] = value


def _digest(value: Any) -> str:
    data = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()

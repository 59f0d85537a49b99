"""Data versioning with DVC: `data/` is tracked by `data.dvc` and pushed to the DVC remote.

DVC is driven through its command line with the repository as working directory: its Python API
resolves paths against the process's current directory, which a library cannot assume.
Concurrent runs are serialized with a lock file, since two DVC commands at once fail on DVC's own lock.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml
from filelock import FileLock

from ..errors import ConfigError, EvaclipError


def find_repo(start: Optional[Path] = None) -> Optional[Path]:
    """The DVC repository (the folder holding `.dvc/`) containing `start`, if any."""
    start = Path(start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def require_repo(path: Path) -> Path:
    repo = find_repo(Path(path).resolve().parent)
    if repo is None:
        raise ConfigError(
            f"data.version: {Path(path).resolve().parent} is not inside a DVC repository: "
            "run `git init && dvc init` there, or set data.version=false"
        )
    return repo


def dvc(args: list[str], repo: Path) -> str:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    with FileLock(str(repo / ".dvc" / "tmp" / "evaclip.lock")):
        result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise EvaclipError(f"`dvc {' '.join(args)}` failed in {repo}:\n{(result.stderr or result.stdout).strip()}")
    return result.stdout


def track_and_push(path: Path, remote: Optional[str] = None, push: bool = True) -> str:
    """`dvc add` the folder, then `dvc push` it; returns the data version (the `.dvc` file's hash)."""
    path = Path(path).resolve()
    repo = require_repo(path)
    relative = path.relative_to(repo)
    dvc(["add", str(relative)], repo)
    if push:
        dvc(["push", f"{relative}.dvc", *(["-r", remote] if remote else [])], repo)
    return data_version(repo / f"{relative}.dvc")


def pull(dvc_file: Path, remote: Optional[str] = None) -> None:
    dvc_file = Path(dvc_file).resolve()
    repo = require_repo(dvc_file)
    dvc(["pull", str(dvc_file.relative_to(repo)), *(["-r", remote] if remote else [])], repo)


def data_version(dvc_file: Path = Path("data.dvc")) -> Optional[str]:
    """The md5 DVC recorded for the tracked folder: what later stages record as the data version."""
    dvc_file = Path(dvc_file)
    if not dvc_file.is_file():
        return None
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")

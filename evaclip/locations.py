"""Where data lives: a local path, a URL (object storage, the web) or a `pipe:` command.

The classification alone, without the readers of evaclip.data.storage: the pipeline's flow process decides
with it whether `prepare` must run again (DVC cannot watch remote shards) without importing torch.
"""

from __future__ import annotations


def is_remote(location: object) -> bool:
    text = str(location)
    return text.startswith("pipe:") or "://" in text and not text.startswith("file://")


def is_pipe(location: object) -> bool:
    return str(location).startswith("pipe:")


def remote_sources(params) -> list[str]:
    """The shard locations `prepare` indexes in place on object storage or the web (DVC cannot watch them)."""
    cfg = params.data
    places = ([cfg.path] if cfg.source == "wds" and cfg.path else []) + [m.path for m in cfg.mix]
    return [p for p in places if is_remote(p)]

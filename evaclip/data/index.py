"""Shards used where they are (a local folder, object storage, the web): the manifest that versions them.

DVC versions this manifest (part of the prepare stage's output), never the shards' bytes: each entry holds
the shard's URL, size, ETag (object stores) or SHA-256 (shards read here), and sample count. A changed
shard (a new ETag) changes the manifest, hence the data version that training records.

Sample counts come from img2dataset's `<shard>_stats.json` sidecars where present (one concurrent batch of
small reads); otherwise one counting pass reads each shard once and records its count and checksum. Local
shards always get the pass (their checksum is their identity). The pass also finds training images that
duplicate evaluation images (`dedup.EvalIndex`); with `drop`, their keys go into the manifest's `exclude`
lists and the loader leaves them out. Only shards that were read are checked (`quality.json` says how many).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from ..errors import EvaclipError
from . import storage
from .dedup import EvalIndex, image_hashes
from .shards import MANIFEST, QUALITY

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
PASS_THREADS = 8  # reads are network-bound; decoding for the duplicate check is the only CPU work


def index_shards(location: str, out_dir: Path, max_skipped_fraction: float, evals: Optional[EvalIndex] = None,
                 drop: bool = False) -> dict:
    """Write `out_dir/manifest.json` and `quality.json` for the shards at `location`; returns the manifest.

    Missing shards of a brace pattern and unreadable ones are skipped and counted against max_skipped_fraction.
    """
    shards, missing = storage.list_shards(location)
    remote = storage.is_remote(location)
    with_sidecars = remote and not storage.is_pipe(location)  # a pipe: is a command, not a place with neighbours
    sidecars = storage.read_sidecars([storage.sidecar_url(s["url"]) for s in shards]) if with_sidecars else {}
    for shard in shards:
        shard["samples"] = storage.sample_count_from_sidecar(sidecars.get(storage.sidecar_url(shard["url"])))
    checking = evals is not None and bool(evals.names)
    # A shard is read when its count is unknown or its checksum is its identity (local), and for the duplicate
    # check only when duplicates are to be dropped: counting them alone never costs a read of a remote set.
    to_read = {s["url"] for s in shards if s["samples"] is None or not remote or (checking and drop)}
    passes = _passes([s["url"] for s in shards if s["url"] in to_read], checking, threads=PASS_THREADS if remote else 1)
    entries, bad = [], {url: "missing" for url in missing}
    for shard in shards:
        result = next(passes) if shard["url"] in to_read else None
        if result is not None and result["error"]:
            bad[shard["url"]] = result["error"]
            continue
        entry = {"name": shard["url"], "samples": shard["samples"], "bytes": shard["bytes"], "etag": shard["etag"]}
        if result is not None:
            entry.update(samples=result["samples"], sha256=result["sha256"])
            found = evals.check_many([hashes for _, hashes in result["images"]]) if checking else []
            excluded = sorted({key for (key, _), duplicate in zip(result["images"], found, strict=True) if duplicate})
            if drop and excluded:
                entry["exclude"] = excluded
                entry["samples"] -= len(excluded)
                evals.dropped += len(excluded)
        entries.append({k: v for k, v in entry.items() if v is not None})
    seen = len(shards) + len(missing)
    quality = {"seen_shards": seen, "skipped": dict(Counter("missing" if e == "missing" else "unreadable_shard"
                                                            for e in bad.values())),
               "skipped_fraction": round(len(bad) / seen, 6), "max_skipped_fraction": max_skipped_fraction,
               "examples": {"skipped_shard": list(bad.items())[:10]} if bad else {},
               "counted_from_sidecars": len(shards) - len(to_read),
               "checked_against_eval": len(to_read) if checking else 0}
    if len(bad) > max_skipped_fraction * seen or not entries:
        raise EvaclipError(f"{location}: {len(bad)} of {seen} shards missing or unreadable "
                           f"(data.max_skipped_fraction {max_skipped_fraction:.2%}): {json.dumps(quality['examples'])}")
    manifest = {"format": "evaclip-shards/1", "total": sum(e["samples"] for e in entries), "shards": entries,
                "source": {"type": "wds", "path": str(location)}}
    _replace_dir(out_dir, {MANIFEST: manifest, QUALITY: quality})
    return manifest


def _passes(urls: list[str], hash_images: bool, threads: int, window: int = 64) -> Iterator[dict]:
    """`_read` of each url, in order, with at most `window` results held at once (a billion images' hashes
    never sit in memory together)."""
    with ThreadPoolExecutor(threads) as pool:
        pending = deque(pool.submit(_read, url, hash_images) for url in urls[:window])
        for url in urls[window:]:
            yield pending.popleft().result()
            pending.append(pool.submit(_read, url, hash_images))
        while pending:
            yield pending.popleft().result()


def _read(url: str, hash_images: bool) -> dict:
    """One pass over a shard: its sample count, SHA-256, and (for the duplicate check) its images' hashes."""
    digest, keys, images = hashlib.sha256(), set(), []
    try:
        with storage.open_shard(url) as raw:
            stream = _Hashing(raw, digest)
            with tarfile.open(fileobj=stream, mode="r|*") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    folder, _, base = member.name.removeprefix("./").rpartition("/")
                    key = f"{folder}/{base.split('.', 1)[0]}".lstrip("/")
                    keys.add(key)
                    if hash_images and base.lower().endswith(IMAGE_SUFFIXES):
                        images.append((key, image_hashes(archive.extractfile(member).read())))
            while stream.read(1 << 20):  # tar padding: the checksum covers the whole object
                pass
    except Exception as err:  # noqa: BLE001 - truncated tars, network errors, undecodable images alike
        return {"error": f"{type(err).__name__}: {err}"}
    return {"error": None, "samples": len(keys), "sha256": digest.hexdigest(), "images": images}


class _Hashing:
    """A read-only stream that hashes what is read through it."""

    def __init__(self, raw, digest):
        self.raw, self.digest = raw, digest

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        return data


def _replace_dir(out_dir: Path, files: dict[str, dict]) -> None:
    """Replace `out_dir` whole: no stale shards or manifest of an earlier source stay behind."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, content in files.items():
        (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)

"""Where shards live: local files, object storage (s3://, gs://, ...), the web (https://), or `pipe:` commands.

Shards are read through fsspec (s3fs for S3: webdataset 1.0.2 has no s3:// handler of its own). Listing
and img2dataset's small sidecar files, a request per shard, go through obstore (Rust's object_store): about
0.3 ms of CPU a request where s3fs spends ~3, which is what makes a manifest of 100k shards a matter of
seconds. Both take credentials and endpoint from the standard variables (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`): AWS, MinIO and rclone alike. Shard locations may be brace patterns as img2dataset
writes them (`s3://bucket/laion/{000000..199999}.tar`), a folder or prefix (every `.tar` under it), or
one shard.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import IO, Optional

import braceexpand

from ..errors import ConfigError
from ..locations import is_pipe, is_remote  # defined beside remote_sources, for processes without torch

# Sequential reads of whole shards: large blocks, few requests. Tests lower it to fail inside a shard.
READ_BLOCK_BYTES = 8 << 20
# A dead server must fail fast: the loader retries with backoff itself (data.read_retries).
S3_OPTIONS = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 20, "retries": {"max_attempts": 2}, "max_pool_connections": 32}}


def filesystem(url: str):
    """The fsspec filesystem of `url` and the path inside it."""
    import fsspec

    protocol = url.split("://", 1)[0]
    options = S3_OPTIONS if protocol in ("s3", "s3a") else {}
    return fsspec.core.url_to_fs(url, **options)


def open_shard(url: str) -> IO[bytes]:
    """A binary stream of one shard."""
    if is_pipe(url):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    if not is_remote(url):
        return open(url.removeprefix("file://"), "rb")
    fs, path = filesystem(url)
    return fs.open(path, "rb", block_size=READ_BLOCK_BYTES)


def list_shards(location: str) -> tuple[list[dict], list[str]]:
    """The shards of `location` ([{url, bytes, etag}], bytes and etag None where the store gives none), and
    those a brace pattern names that do not exist (img2dataset's numbering has gaps where a shard failed).

    Object stores are listed (one request per thousand objects), never asked object by object.
    """
    patterns = list(braceexpand.braceexpand(str(location).removeprefix("file://")))
    if is_pipe(location):
        return [{"url": p, "bytes": None, "etag": None} for p in patterns], []
    if not is_remote(location):
        return _list_local(patterns, location)
    scheme, bucket = _bucket(patterns[0])
    if scheme in ("http", "https"):  # no listing on the web: one HEAD per shard
        fs, _ = filesystem(patterns[0])
        found, missing = [], []
        for p in patterns:
            try:
                found.append(_entry(p, fs.info(p)))
            except FileNotFoundError:
                missing.append(p)
        return found, missing
    if len(patterns) == 1 and not patterns[0].endswith(".tar"):  # a prefix: every .tar under it
        listing = _listing(patterns[0])
        shards = [_entry(url, info) for url, info in sorted(listing.items()) if url.endswith(".tar")]
        if not shards:
            raise ConfigError(f"data: no .tar shards under {location}")
        return shards, []
    listing = {}
    for folder in sorted({p.rsplit("/", 1)[0] + "/" for p in patterns}):
        listing.update(_listing(folder))
    return [_entry(p, listing[p]) for p in patterns if p in listing], [p for p in patterns if p not in listing]


def read_sidecars(urls: list[str], concurrency: int = 64) -> dict[str, Optional[bytes]]:
    """The bytes of each small object in `urls` that exists (concurrent requests), None for the others."""
    if not urls:
        return {}
    if not is_remote(urls[0]):
        return {u: Path(u).read_bytes() if Path(u).is_file() else None for u in urls}
    scheme, bucket = _bucket(urls[0])
    if scheme in ("http", "https"):
        fs, _ = filesystem(urls[0])
        found = fs.cat(urls, on_error="return")
        return {u: found.get(u) if isinstance(found.get(u), bytes) else None for u in urls}
    import obstore

    store = _object_store(urls[0])
    prefix = f"{scheme}://{bucket}/"

    async def read_all() -> list[Optional[bytes]]:
        slots = asyncio.Semaphore(concurrency)

        async def read(url: str) -> Optional[bytes]:
            async with slots:
                try:
                    result = await obstore.get_async(store, url.removeprefix(prefix))
                    return bytes(await result.bytes_async())
                except FileNotFoundError:
                    return None

        return await asyncio.gather(*(read(u) for u in urls))

    return dict(zip(urls, _run(read_all()), strict=True))


def sample_count_from_sidecar(data: Optional[bytes]) -> Optional[int]:
    """img2dataset's `<shard>_stats.json`: the samples written to the shard ("successes")."""
    if data is None:
        return None
    try:
        count = json.loads(data).get("successes")
    except (ValueError, AttributeError):
        return None
    return int(count) if isinstance(count, int) and count >= 0 else None


def sidecar_url(shard_url: str) -> str:
    return shard_url[: -len(".tar")] + "_stats.json" if shard_url.endswith(".tar") else shard_url + "_stats.json"


def _list_local(patterns: list[str], location: str) -> tuple[list[dict], list[str]]:
    missing: list[str] = []
    if len(patterns) == 1 and Path(patterns[0]).is_dir():
        files = sorted(Path(patterns[0]).resolve().rglob("*.tar"))
    else:
        candidates = [Path(p).resolve() for p in patterns]
        files = [f for f in candidates if f.is_file()]
        missing = [str(f) for f in candidates if not f.is_file()]
    if not files:
        raise ConfigError(f"data.path: no .tar shards in {location}")
    return [{"url": str(f), "bytes": f.stat().st_size, "etag": None} for f in files], missing


def _bucket(url: str) -> tuple[str, str]:
    scheme, rest = url.split("://", 1)
    return scheme, rest.split("/", 1)[0]


def _object_store(url: str):
    """obstore's store of `url`'s bucket; endpoint and credentials from the environment (AWS_*)."""
    from obstore.store import from_url

    scheme, bucket = _bucket(url)
    insecure = os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://")  # MinIO, rclone on loopback
    return from_url(f"{scheme}://{bucket}", client_options={"allow_http": True} if insecure else None)


def _listing(folder_url: str) -> dict[str, dict]:
    """url -> {size, ETag} of every object under `folder_url` (paged listing)."""
    import obstore

    scheme, bucket = _bucket(folder_url)
    prefix = folder_url.split("://", 1)[1][len(bucket) + 1:]
    out = {}
    for batch in obstore.list(_object_store(folder_url), prefix=prefix or None, chunk_size=1000):
        for meta in batch:
            out[f"{scheme}://{bucket}/{meta['path']}"] = {"size": meta["size"], "ETag": meta.get("e_tag")}
    return out


def _run(coroutine):
    """Run `coroutine` to completion, also from a thread that already has an event loop (Prefect tasks)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _entry(url: str, info: dict) -> dict:
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("checksum")
    return {"url": url, "bytes": info.get("size"), "etag": str(etag).strip('"') if etag else None}


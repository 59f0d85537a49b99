"""The training loader: webdataset shards -> batches of (images, tokens), deterministic and resumable.

Per rank and per DataLoader worker, the stream is a pure function of (seed, epoch, rank, worker):
shards are shuffled, split by rank and by worker (or, in `resampled` mode, drawn with replacement),
read with webdataset's tar reader, mixed across shard sets by weight, shuffled in a buffer, decoded,
transformed with open_clip's training transforms, tokenized, and batched inside the worker.

Shards are local files or remote objects (`storage`: s3://, https://, pipe:). A shard that cannot be opened,
or fails part-way, is retried with backoff (`data.read_retries`, `data.retry_delay`), continuing after the
samples it already gave; then it is skipped, reported with the batches (`DataReport`), and more skipped
shards than `data.max_skipped_fraction` of a set's shards fail the run naming them.

An epoch is a fixed number of samples, and every worker yields exactly its share of batches, so
ranks never starve (a rank whose shards run out, or are skipped, goes round them again, reshuffled).

A sample's augmentation is a function of (seed, epoch, rank, stream, position in the stream), not of a
running RNG, so a resume reads past the samples already consumed without decoding them: it needs each
stream's position (`DataReport.positions`, saved with checkpoints). Given only a number of samples seen,
it replays and discards the batches instead. Either way the batches after it are exactly those an
uninterrupted run would see.

webdataset's own `WebDataset`/`RandomMix`/`split_by_node` draw from global RNGs and
`torch.distributed`; this module composes its tar reader with explicit RNGs instead.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import DataConfig
from ..errors import ConfigError
from . import storage
from .shards import MANIFEST, read_manifest

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")
MAX_CONSECUTIVE_FAILURES = 1000
MAX_EMPTY_PASSES = 100


@dataclass
class ShardSet:
    name: str
    urls: list[str]
    samples: int
    weight: float = 1.0
    exclude: dict[str, frozenset] = field(default_factory=dict)  # url -> keys left out (duplicates of eval images)


def load_shard_set(path: Path, weight: float = 1.0, name: str = "train", pipes: bool = False) -> ShardSet:
    manifest = read_manifest(path)  # the dataset size comes from the manifest, never from a scan
    urls = [_shard_url(path, entry["name"]) for entry in manifest["shards"]]
    if not pipes and any(storage.is_pipe(u) for u in urls):  # commands come from a params file, nowhere else
        raise ConfigError(f"{path}: its manifest lists pipe: commands, which this configuration does not declare")
    missing = [u for u in urls if not storage.is_remote(u) and not Path(u).is_file()]
    if missing:
        raise ConfigError(f"{path}: {len(missing)} shard(s) of the manifest are missing, e.g. {missing[0]} (dvc pull?)")
    exclude = {url: frozenset(e["exclude"]) for url, e in zip(urls, manifest["shards"], strict=True) if e.get("exclude")}
    return ShardSet(name, urls, manifest["total"], weight, exclude)


def mix_folder(cfg: DataConfig, index: int) -> Path:
    """Where a `data.mix` entry's manifest is: the entry itself if it is a prepared folder, else the one
    `prepare` wrote for shards used in place."""
    entry = cfg.mix[index]
    if not storage.is_remote(entry.path) and (Path(entry.path) / MANIFEST).is_file():
        return Path(entry.path)
    return Path(cfg.output_dir) / "train" / "mix" / (entry.name or f"mix{index}")


def _mixture(cfg: DataConfig) -> list[tuple[str, Path, float]]:
    """(name, folder, weight) of every training shard set: `data.mix`, or the prepared `output_dir/train`."""
    if not cfg.mix:
        return [("train", Path(cfg.output_dir) / "train", 1.0)]
    return [(m.name or f"mix{i}", mix_folder(cfg, i), m.weight) for i, m in enumerate(cfg.mix)]


def training_manifests(cfg: DataConfig) -> list[Path]:
    """The manifest file of every training shard set (prepare writes those of shards used in place)."""
    return [path / MANIFEST for _, path, _ in _mixture(cfg)]


def shard_sets_manifests(cfg: DataConfig) -> list[list[str]]:
    """Each shard's identity (its SHA-256, else its ETag), per shard set: what identifies the training data."""
    out = []
    for _, path, _ in _mixture(cfg):
        try:
            shards = read_manifest(Path(path))["shards"]
        except Exception:  # noqa: BLE001 - no manifest yet: check_runnable reports it
            shards = []
        out.append([(s.get("sha256") or s.get("etag") or s["name"]) + _excluded_digest(s) for s in shards])
    return out


def _excluded_digest(entry: dict) -> str:
    keys = entry.get("exclude")
    return "-" + hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16] if keys else ""


def data_manifest_version(cfg: DataConfig) -> str:
    """One digest of the training shards' identities: a changed shard (a new ETag) is a new version."""
    import json

    return hashlib.sha256(json.dumps(shard_sets_manifests(cfg)).encode()).hexdigest()


def shard_sets(cfg: DataConfig) -> list[ShardSet]:
    pipes = any(storage.is_pipe(p) for p in [cfg.path, *(m.path for m in cfg.mix)] if p)
    return [load_shard_set(path, weight, name, pipes) for name, path, weight in _mixture(cfg)]


class ShardError(Exception):
    """A shard that failed every attempt to read it."""


def read_shard(url: str, retries: int = 3, delay: float = 1.0) -> Iterator[dict]:
    """The samples of one shard; an attempt that fails (to open, or part-way) is retried after `delay`,
    doubled each time, and goes on after the samples already given. Raises ShardError when all fail."""
    given = 0
    for attempt in itertools.count():
        try:
            with storage.open_shard(url) as stream:
                files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
                for index, sample in enumerate(wds.tariterators.group_by_keys(files)):
                    if index >= given:
                        given += 1
                        yield sample
            return
        except Exception as err:  # noqa: BLE001 - network errors, missing objects and truncated tars alike
            if attempt >= retries:
                raise ShardError(f"{type(err).__name__}: {err}") from err
            log.warning("shard %s failed (%s: %s); retry %d of %d", url, type(err).__name__, err, attempt + 1, retries)
            time.sleep(delay * 2**attempt)
    raise AssertionError("unreachable")


@dataclass
class DataReport:
    """What one rank's batches reported: each stream's position (for a resume), the shards skipped, and how
    many samples each shard set gave."""

    positions: dict[int, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    seen: Counter = field(default_factory=Counter)

    def shares(self) -> dict[str, float]:
        total = sum(self.seen.values())
        return {name: count / total for name, count in sorted(self.seen.items())} if total else {}


class _CachedTokenizer:
    """Captions made from class names and templates repeat: each distinct one is tokenized once per worker
    (BPE in Python was a sixth of a loader worker's time on the demo). A bounded cache: unique captions,
    as in web data, only pass through it."""

    def __init__(self, tokenizer: Callable, size: int = 1 << 16):
        self.tokenizer, self.size, self.cache = tokenizer, size, {}

    def __call__(self, caption: str) -> torch.Tensor:
        tokens = self.cache.get(caption)
        if tokens is None:
            tokens = self.tokenizer([caption])[0]
            if len(self.cache) < self.size:
                self.cache[caption] = tokens
        return tokens


class ImageTextStream(IterableDataset):
    """Batches of (images, tokens, batch report) for one rank; see the module docstring."""

    def __init__(
        self,
        sets: Sequence[ShardSet],
        transform: Callable,
        tokenizer: Callable,
        batch_size: int,
        batches_per_epoch: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        resampled: bool = False,
        shuffle_buffer: int = 2000,
        epoch: int = 0,
        skip_batches: int = 0,
        positions: Optional[dict[int, int]] = None,
        retries: int = 3,
        retry_delay: float = 1.0,
    ):
        self.sets, self.transform = list(sets), transform
        self.tokenize = _CachedTokenizer(tokenizer)
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        self.epoch, self.skip_batches, self.positions = epoch, skip_batches, positions or {}
        self.retries, self.retry_delay = retries, retry_delay

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        # A DataLoader takes batch j from worker j % workers. After a resume at global batch `skip`,
        # batch skip + j must be what the uninterrupted run made there, i.e. stream (skip + j) % workers.
        stream = ((info.id if info else 0) + self.skip_batches) % workers
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{stream}")
        skipped: dict[str, str] = {}
        streams = [self._samples(s, i, stream, workers, skipped) for i, s in enumerate(self.sets)]
        raw = _shuffle(_mix(streams, [s.weight for s in self.sets], rng), self.shuffle_buffer, rng)
        n_batches = _share(self.batches_per_epoch, stream, workers)
        skip = _share(self.skip_batches, stream, workers)
        if skip >= n_batches:  # this stream's share of the epoch was consumed before the resume
            return
        position, first = 0, 0
        if skip and stream in self.positions:  # read past what was consumed, decoding nothing
            position, first = self.positions[stream], skip
            for _ in range(position):
                next(raw)
        decoded = self._decoded(raw, stream, position)
        for index in range(first, n_batches):
            batch = _take(decoded, self.batch_size)
            if index >= skip:  # batches before `skip` were consumed before a resume: replay, discard
                report = {"stream": stream, "position": batch[-1][3], "skipped": dict(skipped),
                          "sets": Counter(self.sets[b[2]].name for b in batch)}
                skipped.clear()
                yield torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch]), report

    def _samples(self, shard_set: ShardSet, set_index: int, worker: int, workers: int,
                 skipped: dict[str, str]) -> Iterator[dict]:
        """Raw samples of one shard set for this (rank, worker), endlessly; failed shards go into `skipped`."""
        own_rng = random.Random(f"{self.seed}:{self.epoch}:{set_index}:{self.rank}:{worker}")
        slot, slots = self.rank * workers + worker, self.world_size * workers
        dead: set[str] = set()  # skipped once this epoch: not retried on every later pass
        empty_passes = 0
        for pass_index in itertools.count():
            if self.resampled:
                urls = [own_rng.choice(shard_set.urls) for _ in range(len(shard_set.urls))]
            else:
                urls = shards_for_slot(shard_set.urls, f"{self.seed}:{self.epoch}:{set_index}:{pass_index}", slot, slots)
            count = 0
            for url in urls:
                if url in dead:
                    continue
                excluded = shard_set.exclude.get(url, frozenset())
                try:
                    for sample in read_shard(url, self.retries, self.retry_delay):
                        if sample["__key__"].removeprefix("./") in excluded:
                            continue
                        sample["__set__"] = set_index
                        count += 1
                        yield sample
                except ShardError as err:
                    log.warning("skipping shard %s: %s", url, err)
                    dead.add(url)
                    skipped[url] = str(err)
            empty_passes = empty_passes + 1 if count == 0 else 0
            # A later pass reshuffles (other shards for this slot): give up only when none can give a sample.
            if dead >= set(shard_set.urls) or empty_passes >= MAX_EMPTY_PASSES:
                raise ConfigError(f"data: the shards of {shard_set.name} yield no samples (all unreadable or empty?), "
                                  f"e.g. {dict(list(skipped.items())[:3]) or urls[:3]}")

    def _decoded(self, samples: Iterator[dict], stream: int, start: int) -> Iterator[tuple]:
        """(pixels, tokens, shard set, position after it) of each decodable sample."""
        failures = 0
        for position, sample in enumerate(samples, start=start + 1):
            key = next((k for k in IMAGE_KEYS if k in sample), None)
            try:
                if key is None or "txt" not in sample:
                    raise ValueError("no image or no caption")
                with Image.open(io.BytesIO(sample[key])) as image:
                    pixels = self._augmented(image.convert("RGB"), f"{stream}:{position}")
                tokens = self.tokenize(sample["txt"].decode("utf-8"))
            except Exception as err:  # a bad sample in shards used in place: skip it, say so
                failures += 1
                log.warning("skipping sample %s of %s: %s", sample.get("__key__"), sample.get("__url__"), err)
                if failures >= MAX_CONSECUTIVE_FAILURES:  # never loop forever over undecodable shards
                    raise ConfigError(f"data: {failures} samples in a row could not be decoded, the last "
                                      f"{sample.get('__key__')} of {sample.get('__url__')}: {err}") from err
                continue
            failures = 0
            yield pixels, tokens, sample["__set__"], position

    def _augmented(self, image: Image.Image, where: str) -> torch.Tensor:
        """The transform with a generator seeded by the sample's place: torchvision draws from the global
        RNG, so swap in this sample's own state and give the trainer's back."""
        digest = hashlib.blake2b(f"{self.seed}:{self.epoch}:{self.rank}:{where}".encode(), digest_size=8).digest()
        outer = torch.get_rng_state()
        torch.default_generator.manual_seed(int.from_bytes(digest, "little") >> 1)
        try:
            return self.transform(image)
        finally:
            torch.set_rng_state(outer)


class TrainLoader:
    """A rank's DataLoader yielding (images, tokens), and the `DataReport` its batches fill in.

    More distinct skipped shards of a set than `max_skipped_fraction` of its shards fail the run (counted on this
    rank, which reaches every shard over its reshuffled passes)."""

    def __init__(self, loader: DataLoader, sets: Sequence[ShardSet], report: DataReport, max_skipped_fraction: float):
        self.loader, self.report = loader, report
        self.limits = {s.name: max_skipped_fraction * len(s.urls) for s in sets}
        self.set_of = {url: s.name for s in sets for url in s.urls}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, tokens, batch in self.loader:
            self.report.positions[batch["stream"]] = batch["position"]
            self.report.seen.update(batch["sets"])
            if batch["skipped"]:
                self.report.skipped.update(batch["skipped"])
                self._check()
            yield images, tokens

    def _check(self) -> None:
        for name, limit in self.limits.items():
            failed = sorted(u for u in self.report.skipped if self.set_of.get(u) == name)
            if len(failed) > limit:
                raise ConfigError(
                    f"data: {len(failed)} shard(s) of {name} could not be read (more than data.max_skipped_fraction "
                    f"of its shards): {', '.join(failed[:10])}; last error: {self.report.skipped[failed[-1]]}")


def make_train_loader(
    cfg: DataConfig,
    transform: Callable,
    tokenizer: Callable,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    samples_seen: int = 0,
    report: Optional[DataReport] = None,
) -> tuple[TrainLoader, int]:
    """The loader of one rank for one epoch, and its number of batches.

    `samples_seen` (global, within the epoch) resumes mid-epoch; `report.positions`, as saved with that
    checkpoint, lets the resume read past the consumed samples without decoding them.
    """
    sets = shard_sets(cfg)
    workers = cfg.workers
    if not cfg.resampled:
        fewest = min(len(s.urls) for s in sets)
        if fewest < world_size * max(workers, 1):
            raise ConfigError(
                f"data: {fewest} shard(s) cannot feed {world_size} rank(s) x {max(workers, 1)} worker(s) without "
                "replacement: set data.resampled=true, lower data.workers, or prepare smaller shards "
                "(data.samples_per_shard)"
            )
    samples_per_epoch = cfg.samples_per_epoch or sum(s.samples for s in sets)
    global_batch = batch_size * world_size
    batches = samples_per_epoch // global_batch
    if batches == 0:
        raise ConfigError(f"data: an epoch of {samples_per_epoch} samples holds no global batch of {global_batch}")
    report = report if report is not None else DataReport()
    stream = ImageTextStream(
        sets, transform, tokenizer, batch_size, batches, rank=rank, world_size=world_size, seed=seed,
        resampled=cfg.resampled, shuffle_buffer=cfg.shuffle_buffer, epoch=epoch,
        skip_batches=samples_seen // global_batch, positions=dict(report.positions) if samples_seen else None,
        retries=cfg.read_retries, retry_delay=cfg.retry_delay,
    )
    report.positions = {}
    # A private generator: creating the loader must not draw from the trainer's global RNG, or a
    # resumed run (which creates its loader at another step) would mask tokens differently.
    loader = DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                        prefetch_factor=4 if workers else None, generator=torch.Generator().manual_seed(seed),
                        worker_init_fn=_own_process_group)
    return TrainLoader(loader, sets, report, cfg.max_skipped_fraction), batches - samples_seen // global_batch


def _own_process_group(worker_id: int) -> None:
    """Workers leave their rank's process group, which torchrun signals on a stop: they must not die before the
    rank has checkpointed (a dead worker raises in the rank). They keep SIGTERM, which the DataLoader uses to
    end them, and exit when their rank does (train/preemption.py)."""
    os.setpgid(0, 0)


def shards_for_slot(urls: Sequence[str], pass_seed: str, slot: int, slots: int) -> list[str]:
    """One (rank, worker) slot's shards for one pass: the same shuffle on every rank, then every
    `slots`-th shard, so the slots of a pass are disjoint and together cover every shard."""
    order = list(urls)
    random.Random(pass_seed).shuffle(order)
    return order[slot::slots]


def _share(total: int, worker: int, workers: int) -> int:
    """Batches worker `worker` yields when a DataLoader takes them round-robin."""
    return total // workers + (1 if worker < total % workers else 0)


def _mix(streams: list[Iterator[dict]], weights: list[float], rng: random.Random) -> Iterator[dict]:
    if len(streams) == 1:
        yield from streams[0]
        return
    while True:
        yield next(rng.choices(streams, weights=weights)[0])


def _shuffle(samples: Iterator[dict], buffer_size: int, rng: random.Random) -> Iterator[dict]:
    if buffer_size <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < buffer_size:
            buffer.append(sample)
            continue
        index = rng.randrange(buffer_size)
        buffer[index], sample = sample, buffer[index]
        yield sample


def _shard_url(folder: Path, name: str) -> str:
    """A manifest entry's shard: a URL or absolute path as written, else a file beside the manifest."""
    return name if storage.is_remote(name) or Path(name).is_absolute() else str(Path(folder) / name)


def _take(samples: Iterator, n: int) -> list:
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == n:
            return batch
    raise ConfigError("data: the shard sets yielded no samples")

"""The training loader: webdataset shards -> batches of (images, tokens), deterministic and resumable.

Per rank and per DataLoader worker, the stream is a pure function of (seed, epoch, rank, worker):
shards are shuffled, split by rank and by worker (or, in `resampled` mode, drawn with replacement),
read with webdataset's tar reader, mixed across shard sets by weight, shuffled in a buffer, decoded,
transformed with open_clip's training transforms, tokenized, and batched inside the worker.

An epoch is a fixed number of samples, and every worker yields exactly its share of batches, so
ranks never starve (a rank whose shards run out goes round them again, reshuffled). Resuming from a
number of samples seen replays and discards the batches already consumed, so the batches after it
are exactly those an uninterrupted run would see.

webdataset's own `WebDataset`/`RandomMix`/`split_by_node` draw from global RNGs and
`torch.distributed`; this module composes its tar reader with explicit RNGs instead.
"""

from __future__ import annotations

import io
import itertools
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import DataConfig
from ..errors import ConfigError
from .shards import read_manifest, shard_path

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")
MAX_CONSECUTIVE_FAILURES = 1000


@dataclass
class ShardSet:
    urls: list[str]
    samples: int
    weight: float = 1.0


def load_shard_set(path: Path, weight: float = 1.0) -> ShardSet:
    manifest = read_manifest(path)  # the dataset size comes from the manifest, never from a scan
    urls = [str(shard_path(path, entry["name"])) for entry in manifest["shards"]]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise ConfigError(f"{path}: {len(missing)} shard(s) of the manifest are missing, e.g. {missing[0]} (dvc pull?)")
    return ShardSet(urls, manifest["total"], weight)


def _mixture(cfg: DataConfig) -> list[tuple[Path, float]]:
    """(folder, weight) of every training shard set: `data.mix`, or the prepared `output_dir/train`."""
    return [(Path(m.path), m.weight) for m in cfg.mix] or [(Path(cfg.output_dir) / "train", 1.0)]


def shard_sets_manifests(cfg: DataConfig) -> list[list[str]]:
    """The shard checksums of every shard set: what identifies the training data."""
    out = []
    for path, _ in _mixture(cfg):
        try:
            out.append([s["sha256"] for s in read_manifest(Path(path))["shards"]])
        except Exception:  # noqa: BLE001 - no manifest yet: check_runnable reports it
            out.append([])
    return out


def shard_sets(cfg: DataConfig) -> list[ShardSet]:
    return [load_shard_set(path, weight) for path, weight in _mixture(cfg)]


class ImageTextStream(IterableDataset):
    """Batches of (images, tokens) for one rank; see the module docstring."""

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
    ):
        self.sets, self.transform, self.tokenizer = list(sets), transform, tokenizer
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.resampled, self.shuffle_buffer = resampled, shuffle_buffer
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        # A DataLoader takes batch j from worker j % workers. After a resume at global batch `skip`,
        # batch skip + j must be what the uninterrupted run made there, i.e. stream (skip + j) % workers.
        worker = ((info.id if info else 0) + self.skip_batches) % workers
        stream_seed = f"{self.seed}:{self.epoch}:{self.rank}:{worker}"
        rng = random.Random(stream_seed)
        augment_rng = torch.Generator().manual_seed(rng.getrandbits(63)).get_state()
        streams = [self._samples(s, i, worker, workers) for i, s in enumerate(self.sets)]
        samples = _shuffle(_mix(streams, [s.weight for s in self.sets], rng), self.shuffle_buffer, rng)
        decoded = self._decoded(samples, augment_rng)
        n_batches = _share(self.batches_per_epoch, worker, workers)
        skip = _share(self.skip_batches, worker, workers)
        for index in range(n_batches):
            batch = _take(decoded, self.batch_size)
            if index >= skip:  # batches before `skip` were consumed before a resume: replay, discard
                yield torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])

    def _samples(self, shard_set: ShardSet, set_index: int, worker: int, workers: int) -> Iterator[dict]:
        """Raw samples of one shard set for this (rank, worker), endlessly."""
        own_rng = random.Random(f"{self.seed}:{self.epoch}:{set_index}:{self.rank}:{worker}")
        slot, slots = self.rank * workers + worker, self.world_size * workers
        for pass_index in itertools.count():
            if self.resampled:
                urls = [own_rng.choice(shard_set.urls) for _ in range(len(shard_set.urls))]
            else:
                urls = shards_for_slot(shard_set.urls, f"{self.seed}:{self.epoch}:{set_index}:{pass_index}", slot, slots)
            count = 0
            for sample in wds.tariterators.tarfile_samples([{"url": u} for u in urls], handler=wds.warn_and_continue):
                count += 1
                yield sample
            if count == 0:
                raise ConfigError(f"data: shards {urls[:3]}... yielded no samples (all unreadable?)")

    def _decoded(self, samples: Iterator[dict], rng_state: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        failures = 0
        for sample in samples:
            key = next((k for k in IMAGE_KEYS if k in sample), None)
            try:
                if key is None or "txt" not in sample:
                    raise ValueError("no image or no caption")
                with Image.open(io.BytesIO(sample[key])) as image:
                    # torchvision draws from the global RNG: swap in this stream's own state, so the
                    # augmentations depend on the stream alone, not on the trainer's use of the RNG.
                    outer = torch.get_rng_state()
                    torch.set_rng_state(rng_state)
                    try:
                        pixels = self.transform(image.convert("RGB"))
                    finally:
                        rng_state = torch.get_rng_state()
                        torch.set_rng_state(outer)
                tokens = self.tokenizer([sample["txt"].decode("utf-8")])[0]
            except Exception as err:  # a bad sample in shards used in place: skip it, say so
                failures += 1
                log.warning("skipping sample %s of %s: %s", sample.get("__key__"), sample.get("__url__"), err)
                if failures >= MAX_CONSECUTIVE_FAILURES:  # never loop forever over undecodable shards
                    raise ConfigError(f"data: {failures} samples in a row could not be decoded, the last "
                                      f"{sample.get('__key__')} of {sample.get('__url__')}: {err}") from err
                continue
            failures = 0
            yield pixels, tokens


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
) -> tuple[DataLoader, int]:
    """The loader of one rank for one epoch, and its number of batches.

    `samples_seen` (global, within the epoch) resumes mid-epoch.
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
    stream = ImageTextStream(
        sets, transform, tokenizer, batch_size, batches, rank=rank, world_size=world_size, seed=seed,
        resampled=cfg.resampled, shuffle_buffer=cfg.shuffle_buffer, epoch=epoch,
        skip_batches=samples_seen // global_batch,
    )
    # A private generator: creating the loader must not draw from the trainer's global RNG, or a
    # resumed run (which creates its loader at another step) would mask tokens differently.
    loader = DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=False,
                        prefetch_factor=4 if workers else None, generator=torch.Generator().manual_seed(seed))
    return loader, batches - samples_seen // global_batch


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


def _take(samples: Iterator, n: int) -> list:
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == n:
            return batch
    raise ConfigError("data: the shard sets yielded no samples")

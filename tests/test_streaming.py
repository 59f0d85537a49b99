"""Shards streamed from object storage: a real S3 server on loopback (`rclone serve s3`), stopped, restarted, with
truncated and missing objects; manifests that version what is not copied; resumes that decode nothing twice;
duplicates of evaluation images; the Merged-2B mixture."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from evaclip.config import MixEntry, load_params, profile_path
from evaclip.data import make_train_loader, prepare, storage
from evaclip.data.loader import DataReport, data_manifest_version
from evaclip.data.shards import read_manifest
from evaclip.errors import ConfigError, EvaclipError
from evaclip.model import create_transforms

from .conftest import REPO

BIN = Path(sys.executable).parent
SHARDS, PER_SHARD = 8, 16
PATTERN = "{000000..000007}.tar"


class S3Server:
    """`rclone serve s3` over a folder whose sub-folders are buckets; stoppable and restartable on its port."""

    def __init__(self, root: Path, watch_folder: bool = True):
        self.root, self.watch_folder = root, watch_folder
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [str(BIN / "rclone"), "serve", "s3", str(self.root), "--addr", f"127.0.0.1:{self.port}",
             "--auth-key", "key,secret", "--etag-hash", "MD5", "--force-path-style",
             # objects the tests write into the folder are listed at once (rclone then serves concurrent
             # uploads slowly: tests that write through the S3 API do without)
             *(["--dir-cache-time", "0s"] if self.watch_folder else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("rclone serve s3 did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def picture(value: int) -> Image.Image:
    """A smooth random picture per value: unlike flat colours, each has its own perceptual hash."""
    noise = np.random.default_rng(value).integers(0, 255, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(noise).resize((32, 32), Image.Resampling.BICUBIC)


def png(value: int) -> bytes:
    buffer = io.BytesIO()
    picture(value).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder: Path, word: str = "apple", sidecars: bool = True) -> None:
    """img2dataset's layout: 000000.tar ... with `<shard>_stats.json` beside each."""
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(SHARDS):
        with wds.TarWriter(str(folder / f"{shard:06d}.tar")) as tar:
            for i in range(PER_SHARD):
                n = shard * PER_SHARD + i
                tar.write({"__key__": f"{n:09d}", "png": png(n), "txt": f"{word} {n}".encode()})
        if sidecars:
            (folder / f"{shard:06d}_stats.json").write_text(json.dumps({"count": PER_SHARD, "successes": PER_SHARD}))


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3")
    write_shards(root / "bucket" / "laion")
    server = S3Server(root)
    server.start()
    yield server
    if server.process.poll() is None:
        server.stop()


@pytest.fixture(autouse=True)
def aws(monkeypatch, s3):
    """The standard variables, as AWS, MinIO and rclone users set them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{s3.port}")
    import fsspec

    fsspec.config.conf.clear()
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()  # a new endpoint or server: no cached client


def indexed(tmp_path: Path, location: str, **data) -> Path:
    """`evaclip prepare` of shards used in place; returns the prepared folder (its manifest)."""
    overrides = [f"data.output_dir={tmp_path / 'data'}", "data.source=wds", *(f"data.{k}={v}" for k, v in data.items())]
    params = load_params(REPO / "params.yaml", overrides)
    params.data.path = location  # as a params file holds it (pipe: is refused in overrides)
    prepare(params)
    return tmp_path / "data" / "train"


def loader(folder: Path, batch=8, workers=0, report=None, samples_seen=0, rank=0, world=1, transform=None, **data):
    cfg = load_params(REPO / "params.yaml").data.model_copy(update=dict(
        mix=[MixEntry(path=folder)], workers=workers, shuffle_buffer=16, **{"read_retries": 3, "retry_delay": 0.5, **data}))
    train, _ = create_transforms("evaclip-demo")
    return make_train_loader(cfg, transform or train, words, batch, rank=rank, world_size=world, seed=0,
                             samples_seen=samples_seen, report=report)


def words(texts):
    word, number = texts[0].split()
    return torch.tensor([[{"apple": 1, "banana": 2, "cherry": 3}[word], int(number)]])


def batches(folder: Path, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), t.clone()) for x, t in loader(folder, **kwargs)[0]]


def same(first, second) -> bool:
    return len(first) == len(second) and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                                             for a, b in zip(first, second, strict=True))


@pytest.fixture(scope="module")
def local_reference(s3, tmp_path_factory):
    base = tmp_path_factory.mktemp("local")
    return indexed(base, str(s3.root / "bucket" / "laion"))


def test_remote_shards_are_indexed_not_copied_and_a_changed_object_is_a_new_version(s3, tmp_path):
    folder = indexed(tmp_path, f"s3://bucket/laion/{PATTERN}")
    manifest = read_manifest(folder)
    assert [e["name"] for e in manifest["shards"]][:2] == ["s3://bucket/laion/000000.tar", "s3://bucket/laion/000001.tar"]
    assert manifest["total"] == SHARDS * PER_SHARD and all(len(e["etag"]) == 32 and e["bytes"] > 0 for e in manifest["shards"])
    quality = json.loads((folder / "quality.json").read_text())
    assert quality["counted_from_sidecars"] == SHARDS  # img2dataset's counts: no shard was read
    assert not list((tmp_path / "data").rglob("*.tar"))
    cfg = load_params(REPO / "params.yaml", [f"data.output_dir={tmp_path / 'data'}"]).data
    before = data_manifest_version(cfg)

    victim = s3.root / "bucket" / "laion" / "000003.tar"
    original = victim.read_bytes()
    try:
        with wds.TarWriter(str(victim)) as tar:  # new content, same sample count
            for i in range(PER_SHARD):
                tar.write({"__key__": f"x{i:08d}", "png": png(1000 + i), "txt": f"apple {i}".encode()})
        indexed(tmp_path, f"s3://bucket/laion/{PATTERN}")
        assert data_manifest_version(cfg) != before
    finally:
        victim.write_bytes(original)
    indexed(tmp_path, f"s3://bucket/laion/{PATTERN}")
    assert data_manifest_version(cfg) == before  # the same objects: the same version


def test_without_sidecars_one_counting_pass_records_counts_and_checksums(s3, tmp_path):
    write_shards(s3.root / "bucket" / "bare", sidecars=False)
    manifest = read_manifest(indexed(tmp_path, "s3://bucket/bare/"))  # a prefix: every .tar under it
    assert manifest["total"] == SHARDS * PER_SHARD and all(len(e["sha256"]) == 64 for e in manifest["shards"])
    assert json.loads((tmp_path / "data/train/quality.json").read_text())["counted_from_sidecars"] == 0


def test_streamed_batches_are_the_local_batches(s3, tmp_path, local_reference):
    remote = indexed(tmp_path, f"s3://bucket/laion/{PATTERN}")
    assert same(batches(remote, workers=2), batches(local_reference, workers=2))


def test_server_stopped_in_mid_epoch_and_restarted_loses_and_repeats_nothing(s3, tmp_path, local_reference, monkeypatch):
    remote = indexed(tmp_path, f"s3://bucket/laion/{PATTERN}")
    monkeypatch.setattr(storage, "READ_BLOCK_BYTES", 4096)  # many requests per shard: the stop lands inside one
    expected = batches(local_reference)
    report = DataReport()
    stream, _ = loader(remote, report=report)
    got = []
    for images, tokens in stream:
        got.append((images.clone(), tokens.clone()))
        if len(got) == 3:
            s3.stop()
            threading.Timer(2.0, s3.start).start()  # back within the retries' backoff (0.5 + 1 + 2 s)
    assert same(got, expected)
    assert report.skipped == {}


def test_truncated_and_missing_objects_are_retried_skipped_counted_and_ranks_stay_balanced(s3, tmp_path):
    write_shards(s3.root / "bucket" / "faulty")
    remote = indexed(tmp_path, f"s3://bucket/faulty/{PATTERN}")
    truncated = s3.root / "bucket" / "faulty" / "000002.tar"
    truncated.write_bytes(truncated.read_bytes()[:3000])
    (s3.root / "bucket" / "faulty" / "000005.tar").unlink()
    skipped, counts = {}, []
    for rank in range(2):
        report = DataReport()
        stream, expected = loader(remote, report=report, rank=rank, world=2, retry_delay=0.01, max_skipped_fraction=0.5)
        counts.append((len(list(stream)), expected))
        skipped.update(report.skipped)
    assert counts == [(8, 8), (8, 8)]  # both ranks yield their whole share: no rank starves
    assert sorted(skipped) == ["s3://bucket/faulty/000002.tar", "s3://bucket/faulty/000005.tar"]
    assert "FileNotFoundError" in skipped["s3://bucket/faulty/000005.tar"]

    with pytest.raises(ConfigError, match=r"shard\(s\) of mix0 could not be read.*s3://bucket/faulty/00000[25].tar"):
        for rank in range(2):
            list(loader(remote, rank=rank, world=2, retry_delay=0.01, max_skipped_fraction=0.1)[0])

    # Indexed again: the missing object is counted (img2dataset's numbering has such gaps), not fatal below the limit.
    again = indexed(tmp_path / "again", f"s3://bucket/faulty/{PATTERN}", max_skipped_fraction=0.2)
    assert json.loads((again / "quality.json").read_text())["skipped"] == {"missing": 1}
    assert read_manifest(again)["total"] == (SHARDS - 1) * PER_SHARD
    with pytest.raises(EvaclipError, match="1 of 8 shards missing or unreadable"):
        indexed(tmp_path / "strict", f"s3://bucket/faulty/{PATTERN}")


def test_a_resume_reads_past_consumed_samples_without_decoding_them(local_reference):
    decoded = []
    train, _ = create_transforms("evaclip-demo")

    def counting(image):
        decoded.append(1)
        return train(image)

    full = batches(local_reference, batch=4, transform=counting)
    report = DataReport()
    stream, _ = loader(local_reference, batch=4, report=report)
    for index, _ in enumerate(stream):
        if index == 9:
            break
    positions = dict(report.positions)
    decoded.clear()
    resumed = batches(local_reference, batch=4, transform=counting, samples_seen=10 * 4,
                      report=DataReport(positions=positions))
    assert same(resumed, full[10:])
    assert len(decoded) == len(resumed) * 4  # only what the resumed run yields was decoded
    decoded.clear()
    assert same(batches(local_reference, batch=4, transform=counting, samples_seen=10 * 4), full[10:])
    assert len(decoded) == len(full) * 4  # without positions: the consumed batches are decoded again


def test_pipe_locations_come_from_a_params_file_only(tmp_path, local_reference):
    with pytest.raises(ConfigError, match="pipe: locations are accepted from a params file only"):
        load_params(REPO / "params.yaml", ["data.path=pipe:curl -s http://example/x.tar"])
    with pytest.raises(ConfigError, match="pipe:"):
        load_params(REPO / "params.yaml", ['data.mix=[{path: "pipe:cat /etc/passwd"}]'])
    shard = read_manifest(local_reference)["shards"][0]["name"]
    params_file = tmp_path / "params.yaml"
    params_file.write_text((REPO / "params.yaml").read_text().replace(
        "  source: fashion_mnist", "  source: wds").replace("  path: data ", f"  path: 'pipe:cat {shard}' "))
    params = load_params(params_file, [f"data.output_dir={tmp_path / 'data'}", "data.max_skipped_fraction=0"])
    prepare(params)
    manifest = read_manifest(tmp_path / "data/train")
    assert manifest["total"] == PER_SHARD and manifest["shards"][0]["name"] == f"pipe:cat {shard}"


def test_duplicates_of_evaluation_images_are_counted_and_dropped_from_streamed_sets(s3, tmp_path):
    evalset = tmp_path / "eval"
    for label, n in (("a", 3), ("b", 40)):  # sample 3 exactly; sample 40 resized and re-encoded (near)
        (evalset / label).mkdir(parents=True)
        image = picture(n)
        if n == 3:
            image.save(evalset / label / "x.png")
        else:
            image.resize((64, 64), Image.Resampling.BICUBIC).save(evalset / label / "x.jpg", quality=90)
    location = f"s3://bucket/laion/{PATTERN}"
    params = load_params(REPO / "params.yaml", [f"data.output_dir={tmp_path / 'data'}", "data.source=wds",
                                                f"eval.sets=[{evalset}]", "data.near_duplicate_bits=6"])
    params.data.path = location
    prepare(params)  # counting only: the sidecars give the counts, no remote shard is read for the check
    quality = json.loads((tmp_path / "data/train/quality.json").read_text())
    assert quality["counted_from_sidecars"] == SHARDS and quality["checked_against_eval"] == 0
    params.data.dedup_against_eval = True
    prepare(params)  # dropping: every shard is read once and checked
    assert json.loads((tmp_path / "data/train/quality.json").read_text())["checked_against_eval"] == SHARDS
    report = json.loads((tmp_path / "data/dedup.json").read_text())
    assert report["sets"]["eval"] == {"exact": 1, "near": 2} and report["dropped"] == 2
    manifest = read_manifest(tmp_path / "data/train")
    assert manifest["total"] == SHARDS * PER_SHARD - report["dropped"]
    seen = {int(t[1]) for _, tokens in loader(tmp_path / "data/train", batch=8)[0] for t in tokens}
    assert 3 not in seen and 40 not in seen and len(seen) > 100  # left out; the rest streams as before


def test_merged_2b_profile_mixes_laion_and_coyo_at_the_papers_weights(s3, tmp_path):
    params = load_params(profile_path("eva02-clip-b16"))
    weights = {m.name: m.weight for m in params.data.mix}
    assert set(weights) == {"laion2b", "coyo700m"} and params.data.resampled
    assert all(storage.is_remote(m.path) for m in params.data.mix)
    write_shards(s3.root / "bucket" / "coyo", word="banana")
    mix = [MixEntry(path=f"s3://bucket/laion/{PATTERN}", weight=weights["laion2b"], name="laion2b"),
           MixEntry(path=f"s3://bucket/coyo/{PATTERN}", weight=weights["coyo700m"], name="coyo700m")]
    data = load_params(REPO / "params.yaml", [f"data.output_dir={tmp_path / 'data'}", "data.source=wds"])
    data.data.path, data.data.mix = None, mix
    result = prepare(data)  # indexes both mixture entries in place, under train/ (what training depends on)
    assert result.manifest is None and sorted(Path(f).name for f in result.manifests) == ["coyo700m", "laion2b"]
    assert all(Path(f).parent == tmp_path / "data/train/mix" for f in result.manifests)
    cfg = data.data.model_copy(update=dict(resampled=True, samples_per_epoch=4096, workers=2))
    report = DataReport()
    train, _ = create_transforms("evaclip-demo")
    stream, _ = make_train_loader(cfg, train, words, 64, seed=0, report=report)
    ids = [int(t[0]) for _, tokens in stream for t in tokens]
    total = sum(weights.values())
    assert len(ids) == 4096
    for name, share in report.shares().items():
        assert abs(share - weights[name] / total) < 0.02, report.shares()
    assert abs(ids.count(1) / len(ids) - weights["laion2b"] / total) < 0.02  # what the batches really held

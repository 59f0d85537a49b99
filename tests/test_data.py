"""`evaclip prepare` (dvc.yaml's first stage), DVC remotes, the training loader and the evaluation sets, on real data."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from evaclip import project
from evaclip.config import MixEntry, load_params
from evaclip.data import load_eval_set, make_train_loader, prepare
from evaclip.data.loader import shards_for_slot
from evaclip.data.shards import read_manifest, verify_shards
from evaclip.errors import ConfigError, EvaclipError
from evaclip.model import create_transforms

from .conftest import REPO, make_project

BIN = Path(sys.executable).parent


def run(args, cwd, env=None):
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1", **(env or {}))
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result.stdout


def git_dvc_repo(root: Path, remote: Path) -> Path:
    root.mkdir(parents=True)
    run(["git", "init", "-q"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "remote", "add", "-d", "local", str(remote)], root)
    return root


def commit(root: Path, message: str = "data") -> None:
    run(["git", "add", "-A"], root)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "-m", message], root)


def params_for(root: Path, **data):
    overrides = [f"data.output_dir={root / 'data'}", *(f"data.{k}={v}" for k, v in data.items())]
    return load_params(REPO / "params.yaml", overrides)


def png(color, size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def red_blue_pairs(root: Path, n: int) -> Path:
    """`n` 32x32 caption pairs, red to blue, captioned by their half: a source a tiny CLIP can learn."""
    root.mkdir(parents=True)
    step = 256 // n
    for i in range(n):
        (root / f"{i:03d}.png").write_bytes(png((step * i, 0, 255 - step * i), size=(32, 32)))
        (root / f"{i:03d}.txt").write_text(f"a {'red' if i < n // 2 else 'blue'} square")
    return root


def image_folder(root: Path, per_class=6, classes=("cat", "dog", "sea_lion")) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(png((40 * c, 10 * i, 100)))
    return root


# --- Fashion-MNIST, the embedded default -----------------------------------------------------------

@pytest.fixture(scope="module")
def fashion_repo(tmp_path_factory):
    """The demo's data as a fresh clone gets it: data.dvc imports the Debian files, `dvc repro prepare`
    shards them, `dvc push` sends both to a local remote."""
    base = tmp_path_factory.mktemp("fashion")
    root = make_project(base / "repo", [], remote=base / "remote", data_dvc=True)
    run(["dvc", "repro", "prepare"], root)
    run(["dvc", "push", "-q"], root)
    commit(root)
    return root, read_manifest(root / "outputs/data/train")


def test_fashion_mnist_becomes_caption_shards_and_a_zero_shot_set(fashion_repo):
    root, manifest = fashion_repo
    assert manifest["total"] == 60000 and len(manifest["shards"]) == 12
    assert manifest["classnames"][0] == "t-shirt"
    with tarfile.open(root / "outputs/data/train" / manifest["shards"][0]["name"]) as shard:
        captions = {shard.extractfile(m).read().decode() for m in shard if m.name.endswith(".txt")}
    templates = load_params(REPO / "params.yaml").data.caption_templates
    assert len(captions) > 10 and all(any(c == t.format(n) for t in templates for n in manifest["classnames"]) for c in captions)

    evalset = load_eval_set(root / "outputs/data/eval/fashion_mnist")
    assert evalset.layout == "clip_benchmark" and len(evalset.templates) == 80
    assert evalset.classnames[-1] == "ankle boot"
    labels = [label for _, label in evalset.samples()]
    assert len(labels) == 10000 and sorted(set(labels)) == list(range(10))
    assert json.loads((root / "outputs/data/train/quality.json").read_text())["skipped"] == {}


# The prepared shards' DVC hash, as the machine that committed this test computed it from the Debian package:
# the shards are byte-for-byte deterministic, so every machine (and every dvc.lock) gets the same data version.
FASHION_SHARDS_MD5 = "8aa85bafa8b12a5705cc14c06272aca7.dir"


def test_shards_are_deterministic_so_the_data_version_is_too(fashion_repo):
    root, _ = fashion_repo
    assert project.data_version(root, load_params(root / "params.yaml")) == FASHION_SHARDS_MD5


def test_a_fresh_clone_pulls_the_data_and_its_shards(fashion_repo, tmp_path):
    root, manifest = fashion_repo
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    assert not (clone / "data").exists() and not (clone / "outputs").exists()
    run(["dvc", "pull", "-q", "data.dvc", "prepare"], clone)  # the stages that ran, as dvc.lock records them
    verify_shards(clone / "outputs/data/train")
    assert read_manifest(clone / "outputs/data/train") == manifest
    assert "up to date" in run(["dvc", "status", "data.dvc", "prepare"], clone)


def test_missing_fashion_mnist_package_says_how_to_install(tmp_path):
    with pytest.raises(EvaclipError, match="apt-get install dataset-fashion-mnist"):
        prepare(params_for(tmp_path, path=tmp_path / "nowhere"))


# --- other sources and bad input -------------------------------------------------------------------

def test_image_folder_is_deterministic_byte_for_byte(tmp_path):
    source = image_folder(tmp_path / "src")
    first = prepare(params_for(tmp_path / "a", source="image_folder", path=source))
    second = prepare(params_for(tmp_path / "b", source="image_folder", path=source))
    assert first.manifest["shards"] == second.manifest["shards"]  # names, sizes and sha256
    assert first.manifest["classnames"] == ["cat", "dog", "sea lion"]


def test_bad_samples_are_skipped_counted_and_reported(tmp_path):
    source = image_folder(tmp_path / "src", per_class=40)
    good = (source / "cat/0.png").read_bytes()
    (source / "cat/1.png").write_bytes(good[: len(good) // 2])  # truncated
    (source / "dog/2.png").write_bytes(b"not an image at all")  # corrupt
    params = params_for(tmp_path, source="image_folder", path=source, max_skipped_fraction=0.05)
    result = prepare(params)
    quality = json.loads((tmp_path / "data/train/quality.json").read_text())
    assert quality["skipped"] == {"corrupt_image": 2} and quality["written"] == 118
    assert result.manifest["total"] == 118


def test_too_many_bad_samples_fail_and_leave_the_previous_data_intact(tmp_path):
    source = image_folder(tmp_path / "src")
    prepare(params_for(tmp_path, source="image_folder", path=source))
    before = read_manifest(tmp_path / "data/train")
    for i in range(3):
        (source / "cat" / f"{i}.png").write_bytes(b"garbage")
    with pytest.raises(EvaclipError, match=r"3 of 18 samples skipped .* > data.max_skipped_fraction"):
        prepare(params_for(tmp_path, source="image_folder", path=source))
    assert read_manifest(tmp_path / "data/train") == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["dedup.json", "train"]  # no temporary folder left


def test_caption_pairs_from_a_folder_count_caption_problems(tmp_path):
    source = tmp_path / "pairs"
    source.mkdir()
    for i in range(100):
        (source / f"img{i:03d}.png").write_bytes(png((i, 0, 0)))
        (source / f"img{i:03d}.txt").write_text(f"a red square number {i}")
    (source / "img000.txt").unlink()
    (source / "img001.txt").write_text("   ")
    (source / "img002.txt").write_bytes(b"\xff\xfe caption")
    result = prepare(params_for(tmp_path, source="pairs", path=source, max_skipped_fraction=0.05))
    quality = json.loads((tmp_path / "data/train/quality.json").read_text())
    assert quality["skipped"] == {"empty_caption": 1, "missing_caption": 1, "non_utf8_caption": 1}
    assert result.manifest["total"] == 97


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_caption_pairs_from_a_table(tmp_path, fmt):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(5):
        (tmp_path / "img" / f"{i}.png").write_bytes(png((0, i, 0)))
        rows.append({"filepath": f"img/{i}.png", "title": f"green {i}"})
    table = tmp_path / f"pairs.{fmt}"
    getattr(pd.DataFrame(rows), f"to_{fmt}")(table, index=False) if fmt == "csv" else pd.DataFrame(rows).to_parquet(table)
    result = prepare(params_for(tmp_path / "out", source="pairs", path=table, image_column="filepath",
                                caption_column="title"))
    assert result.manifest["total"] == 5

    with pytest.raises(ConfigError, match="data.caption_column: column 'caption' not in .*columns: filepath, title"):
        prepare(params_for(tmp_path / "out2", source="pairs", path=table, image_column="filepath"))
    assert not (tmp_path / "out2").exists()  # failed before any work


def test_unreadable_source_path_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="data.path: .*missing is not a readable folder"):
        prepare(params_for(tmp_path, source="image_folder", path=tmp_path / "missing"))
    assert not (tmp_path / "data").exists()


def test_img2dataset_shards_are_indexed_in_place_and_truncated_tars_skipped(tmp_path):
    shards = tmp_path / "laion"
    shards.mkdir()
    for s in range(4):
        with tarfile.open(shards / f"{s:05d}.tar", "w") as tar:
            for i in range(10):
                for ext, data in (("jpg", png((s, i, 0))), ("txt", b"a caption"), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{s:05d}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    whole = (shards / "00003.tar").read_bytes()
    (shards / "00003.tar").write_bytes(whole[:2000])
    with pytest.raises(EvaclipError, match="1 of 4 shards missing or unreadable"):
        prepare(params_for(tmp_path, source="wds", path=shards))
    result = prepare(params_for(tmp_path, source="wds", path=shards, max_skipped_fraction=0.3))
    assert result.manifest["total"] == 30 and all(Path(s["name"]).is_absolute() for s in result.manifest["shards"])
    assert not list((tmp_path / "data/train").glob("*.tar"))  # used in place, only indexed


def test_push_and_pull_through_a_real_s3_server(tmp_path):
    """DVC's S3 remote against `rclone serve s3` on loopback: the same code path as MinIO or AWS."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "s3" / "bucket").mkdir(parents=True)
    server = subprocess.Popen(
        [str(BIN / "rclone"), "serve", "s3", str(tmp_path / "s3"), "--addr", f"127.0.0.1:{port}",
         "--auth-key", "key,secret", "--etag-hash", "MD5", "--force-path-style"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port)
        source = image_folder(tmp_path / "src")
        root = make_project(tmp_path / "repo", ["data.source=image_folder", f"data.path={source}"])
        run(["dvc", "remote", "add", "-d", "s3", "s3://bucket/dvc"], root)  # the one config line
        run(["dvc", "remote", "modify", "s3", "endpointurl", f"http://127.0.0.1:{port}"], root)
        credentials = {"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret"}
        run(["dvc", "repro", "prepare"], root)
        run(["dvc", "push"], root, env=credentials)
        assert list((tmp_path / "s3/bucket/dvc").rglob("*"))  # objects reached the server
        commit(root)
        clone = tmp_path / "clone"
        run(["git", "clone", "-q", str(root), str(clone)], tmp_path)
        run(["dvc", "pull", "-q", "prepare"], clone, env=credentials)
        assert read_manifest(clone / "outputs/data/train") == read_manifest(root / "outputs/data/train")
        verify_shards(clone / "outputs/data/train")
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_for_port(port: int, attempts: int = 100) -> None:
    import socket
    import time

    for _ in range(attempts):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


# --- the training loader ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """Two shard sets of 8 shards x 8 samples whose captions tell them apart."""
    base = tmp_path_factory.mktemp("loader")
    sets = []
    for name, word in (("a", "apple"), ("b", "banana")):
        src = base / f"src-{name}"
        src.mkdir()
        for i in range(64):
            (src / f"{name}{i:03d}.png").write_bytes(png((i * 3, 0, 0)))
            (src / f"{name}{i:03d}.txt").write_text(f"{word} {i}")
        out = base / name
        prepare(params_for(out, source="pairs", path=src, samples_per_shard=8))
        sets.append(out / "data/train")
    return sets


def _loader(sets, weights=(1.0,), batch=8, rank=0, world=1, workers=0, seed=0, samples_seen=0, **data):
    data = {"shuffle_buffer": 16, **data}
    cfg = load_params(REPO / "params.yaml").data.model_copy(update=dict(
        mix=[MixEntry(path=s, weight=w) for s, w in zip(sets, weights, strict=False)], workers=workers, **data,
    ))
    train, _ = create_transforms("evaclip-demo")
    return make_train_loader(cfg, train, _echo_tokenizer, batch, rank=rank, world_size=world, seed=seed,
                             samples_seen=samples_seen)


def _echo_tokenizer(texts):
    """Caption -> (word id, number): lets tests see which samples came out, with the real pipeline."""
    word, number = texts[0].split()
    return torch.tensor([[{"apple": 1, "banana": 2}[word], int(number)]])


def _ids(loader):
    return [tuple(row.tolist()) for _, tokens in loader for row in tokens]


def test_a_pass_splits_shards_disjointly_over_ranks_and_workers():
    urls = [f"s{i}" for i in range(12)]
    slots = [shards_for_slot(urls, "0:0:0:0", slot, 4) for slot in range(4)]
    assert sorted(u for s in slots for u in s) == sorted(urls)


def test_ranks_and_workers_see_disjoint_samples_in_one_epoch(small_shards):
    seen = []
    for rank in range(2):
        loader, batches = _loader(small_shards[:1], rank=rank, world=2, workers=2, shuffle_buffer=0)
        ids = _ids(loader)
        assert batches == 4 and len(ids) == 32  # an epoch is 64 samples: 4 batches of 8 per rank
        seen += ids
    assert len(set(seen)) == 64  # every sample once


def test_same_seed_same_batches_other_seed_other_batches(small_shards):
    first = _ids(_loader(small_shards[:1], workers=2)[0])
    assert first == _ids(_loader(small_shards[:1], workers=2)[0])
    assert first != _ids(_loader(small_shards[:1], workers=2, seed=1)[0])


def test_resume_from_samples_seen_continues_exactly(small_shards):
    torch.manual_seed(0)
    loader, _ = _loader(small_shards[:1], batch=4, rank=1, world=2, workers=2)
    full = [(x.clone(), t.clone()) for x, t in loader]
    resumed, remaining = _loader(small_shards[:1], batch=4, rank=1, world=2, workers=2, samples_seen=3 * 4 * 2)
    rest = list(resumed)
    assert remaining == len(rest) == len(full) - 3
    for (x1, t1), (x2, t2) in zip(full[3:], rest, strict=True):
        assert torch.equal(t1, t2) and torch.equal(x1, x2)  # augmentations included


def test_too_few_shards_fail_clearly_unless_resampled(small_shards):
    with pytest.raises(ConfigError, match=r"8 shard\(s\) cannot feed 4 rank\(s\) x 4 worker\(s\).*resampled=true"):
        _loader(small_shards[:1], world=4, rank=0, workers=4)
    loader, batches = _loader(small_shards[:1], world=4, rank=3, workers=4, resampled=True, samples_per_epoch=256)
    assert len(list(loader)) == batches == 8  # resampled ranks never starve


def test_sources_mix_by_weight_deterministically(small_shards):
    ids = _ids(_loader(small_shards, weights=(3.0, 1.0), batch=16, samples_per_epoch=1024)[0])
    share_a = sum(1 for word, _ in ids if word == 1) / len(ids)
    assert 0.70 < share_a < 0.80
    assert ids == _ids(_loader(small_shards, weights=(3.0, 1.0), batch=16, samples_per_epoch=1024)[0])


# --- evaluation sets -------------------------------------------------------------------------------

def test_imagenet_validation_folder_gets_open_clip_names_and_80_templates(tmp_path):
    root = tmp_path / "val"
    rng = np.random.default_rng(0)
    for i in range(1000):
        (root / f"n{1440764 + i:08d}").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / "n01440764" / "ILSVRC2012_val_1.JPEG")
    evalset = load_eval_set(root)
    assert evalset.layout == "imagenet" and evalset.classnames[:2] == ["tench", "goldfish"]
    assert len(evalset.templates) == 80 and evalset.templates[0] == "a bad photo of a {c}."
    assert [label for _, label in evalset.samples()] == [0]


def test_image_folder_eval_set_with_class_names_and_templates(tmp_path):
    root = image_folder(tmp_path / "eval", per_class=2)
    (root / "classnames.txt").write_text("cat\ndog\nsea lion\n")
    assert load_eval_set(root, templates="simple").templates[0] == "itap of a {c}."
    evalset = load_eval_set(root)
    assert evalset.classnames == ["cat", "dog", "sea lion"] and len(list(evalset.samples())) == 6


def test_caption_eval_set_for_retrieval(tmp_path):
    root = tmp_path / "captions"
    root.mkdir()
    (root / "a.png").write_bytes(png((1, 2, 3)))
    (root / "a.txt").write_text("first caption\nsecond caption\n")
    evalset = load_eval_set(root)
    assert evalset.kind == "retrieval"
    assert [captions for _, captions in evalset.samples()] == [["first caption", "second caption"]]

"""Streaming from object storage: the training loader's images/s from a loopback S3 server (`rclone serve s3`)
against the same shards read from local disk, measured alternately; and the time `prepare` takes to write the
manifest of 2,000 and 20,000 remote shards with img2dataset sidecars (small synthetic objects).

The loader shards are Fashion-MNIST images (Debian's dataset-fashion-mnist) with class-name captions, as the
demo's; the server runs on this machine, so it competes with the loader for the same 2 cores.
Writes benchmarks/results/streaming.json.

    python benchmarks/bench_streaming.py [--shards 16] [--per-shard 1000] [--batches 30] [--reps 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import webdataset as wds
from results_io import save

from evaclip.config import MixEntry, load_params
from evaclip.data import make_train_loader, storage
from evaclip.data.index import index_shards
from evaclip.data.sources import FASHION_MNIST_CLASSES, fashion_mnist
from evaclip.model import create_transforms, get_tokenizer

REPO = Path(__file__).resolve().parents[1]


def start_server(root: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rclone = Path(sys.executable).parent / "rclone"
    server = subprocess.Popen([str(rclone), "serve", "s3", str(root), "--addr", f"127.0.0.1:{port}", "--auth-key",
                               "key,secret", "--etag-hash", "MD5", "--force-path-style"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.05)
    os.environ.update(AWS_ACCESS_KEY_ID="key", AWS_SECRET_ACCESS_KEY="secret", AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    return server, port


def write_loader_shards(folder: Path, shards: int, per_shard: int) -> None:
    folder.mkdir(parents=True)
    source = fashion_mnist(None, ["a photo of a {}."], 0)
    samples = iter(source.samples)
    for shard in range(shards):
        with wds.TarWriter(str(folder / f"{shard:06d}.tar")) as tar:
            for _ in range(per_shard):
                s = next(samples)
                tar.write({"__key__": s.key, "png": s.image, "txt": s.caption})
        (folder / f"{shard:06d}_stats.json").write_text(json.dumps({"successes": per_shard}))


def loader_rate(manifest_dir: Path, batch: int, batches: int) -> float:
    params = load_params(REPO / "params.yaml")
    cfg = params.data.model_copy(update={"mix": [MixEntry(path=manifest_dir)], "workers": 2})
    train, _ = create_transforms(params.model.name)
    loader, _ = make_train_loader(cfg, train, get_tokenizer(params.model.name), batch, seed=0)
    iterator = iter(loader)
    next(iterator)  # worker start-up and the shuffle buffer's first fill are not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch / (time.perf_counter() - start)


def synthetic_shard(index: int) -> bytes:
    """A one-sample webdataset shard (a few KB), distinct per index."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for ext, data in (("txt", f"a photo of a {FASHION_MNIST_CLASSES[index % 10]} {index}".encode()),
                          ("jpg", os.urandom(2048))):
            info = tarfile.TarInfo(f"{index:09d}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_synthetic_set(root: Path, bucket: str, shards: int) -> None:
    folder = root / bucket / f"set{shards}"
    folder.mkdir(parents=True)
    for index in range(shards):
        (folder / f"{index:06d}.tar").write_bytes(synthetic_shard(index))
        (folder / f"{index:06d}_stats.json").write_text(json.dumps({"count": 1, "successes": 1}))


def manifest_seconds(bucket: str, shards: int, work: Path) -> dict:
    """The whole manifest (listing, sidecars, writing), and the listing alone, of `shards` remote shards."""
    location = f"s3://{bucket}/set{shards}/{{000000..{shards - 1:06d}}}.tar"
    start = time.perf_counter()
    manifest = index_shards(location, work / f"m{shards}", 0.0)
    seconds = time.perf_counter() - start
    assert manifest["total"] == shards and len(manifest["shards"]) == shards
    start = time.perf_counter()
    listed, _ = storage.list_shards(location)
    assert len(listed) == shards
    return {"manifest": seconds, "listing_alone": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--manifest-sizes", default="2000,20000")
    args = parser.parse_args()
    torch_threads = os.environ.get("OMP_NUM_THREADS")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "s3"
        write_loader_shards(root / "data" / "fmnist", args.shards, args.per_shard)
        sizes = [int(s) for s in args.manifest_sizes.split(",")]
        for n in sizes:  # before the server starts: it lists folders once, then caches them
            write_synthetic_set(root, "synthetic", n)
        server, _ = start_server(root)
        try:
            last = args.shards - 1
            local = tmp / "local"
            remote = tmp / "remote"
            index_shards(str(root / "data" / "fmnist"), local, 0.0)
            index_shards(f"s3://data/fmnist/{{000000..{last:06d}}}.tar", remote, 0.0)
            rates: dict[str, list[float]] = {"local": [], "s3": []}
            for _ in range(args.reps):  # alternately: the machine's drift hits both alike
                rates["local"].append(loader_rate(local, args.batch, args.batches))
                rates["s3"].append(loader_rate(remote, args.batch, args.batches))
            timings = {str(n): manifest_seconds("synthetic", n, tmp) for n in sizes}
        finally:
            server.terminate()
            server.wait(timeout=30)
    local_rate, s3_rate = statistics.median(rates["local"]), statistics.median(rates["s3"])
    result = {
        "images_per_s": {"local": local_rate, "s3": s3_rate, "runs": rates},
        "s3_over_local_images_per_s": s3_rate / local_rate,
        "manifest_seconds": {n: t["manifest"] for n, t in timings.items()},
        "manifest_20k_shards_seconds": timings.get("20000", {}).get("manifest"),
        "manifest_seconds_per_1k_shards": {n: t["manifest"] / (int(n) / 1000) for n, t in timings.items()},
        "listing_seconds_per_1k_shards": {n: t["listing_alone"] / (int(n) / 1000) for n, t in timings.items()},
        "setup": {"shards": args.shards, "per_shard": args.per_shard, "batch": args.batch, "batches": args.batches,
                  "reps": args.reps, "workers": 2, "server": "rclone serve s3 on 127.0.0.1 (same machine)",
                  "omp_num_threads": torch_threads},
    }
    save("streaming", result)
    print("\n| measure | value |\n|---|---|")
    print(f"| loader images/s, local | {local_rate:.0f} |\n| loader images/s, S3 | {s3_rate:.0f} |")
    print(f"| S3 / local | {s3_rate / local_rate:.2f} (goal >= 0.8) |")
    for n, t in timings.items():
        print(f"| manifest of {n} shards (s); listing alone | {t['manifest']:.1f}; {t['listing_alone']:.1f} |")


if __name__ == "__main__":
    main()

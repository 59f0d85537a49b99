"""Duplicates of evaluation images in the demo's training data, and what the check costs in `prepare`.

Fashion-MNIST (Debian's dataset-fashion-mnist): the 60k training images checked against the 10k test images
with `evaclip.data.dedup` at several `data.near_duplicate_bits`, as `prepare` does it (PNG bytes in, exact and
256-bit difference hashes). Writes benchmarks/results/dedup.json.

    python benchmarks/bench_dedup.py [--bits 0,2,4,8]
"""

from __future__ import annotations

import argparse
import time

from results_io import save

from evaclip.data.dedup import EvalIndex, image_hashes
from evaclip.data.sources import fashion_mnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="0,2,4,8")
    args = parser.parse_args()
    source = fashion_mnist(None, ["a photo of a {}."], 0)
    test = [s.image for s in source.eval_samples]
    train = [s.image for s in source.samples]  # PNG bytes, as prepare has them: encoding is not the check's cost
    start = time.perf_counter()
    train_hashes = [image_hashes(image) for image in train]
    hash_seconds = time.perf_counter() - start
    counts, seconds = {}, {}
    for bits in (int(b) for b in args.bits.split(",")):
        index = EvalIndex(bits)
        start = time.perf_counter()
        for image in test:
            index.add("fashion_mnist", image)
        index.check_many(train_hashes)
        seconds[str(bits)] = time.perf_counter() - start
        counts[str(bits)] = index.report()["sets"]["fashion_mnist"]
    result = {"train_images": len(train_hashes), "eval_images": len(test), "duplicates": counts,
              "hash_train_seconds": hash_seconds, "index_and_search_seconds": seconds}
    save("dedup", result)
    print("\n| near_duplicate_bits | exact | near | seconds (hash 60k + search) |\n|---|---|---|---|")
    for bits, found in counts.items():
        print(f"| {bits} | {found['exact']} | {found['near']} | {hash_seconds + seconds[bits]:.1f} |")


if __name__ == "__main__":
    main()

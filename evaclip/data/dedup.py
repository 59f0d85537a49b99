"""Training images that duplicate an evaluation image: counted, and dropped on request (`data.dedup_against_eval`).

A zero-shot figure means little if the test images were seen in training. Two checks per training image:
exact (the same decoded pixels, whatever the encoding) and near (a 256-bit difference hash within
`data.near_duplicate_bits` bits: resized, re-encoded or slightly edited copies). 256 bits, not the usual 64:
on Fashion-MNIST's small centred items a 64-bit hash put 41% of the training images within 4 bits of
some test image, a 256-bit one 0.08% (measured on 20,000 training images).

The difference hash is written here (ten lines on PIL and numpy) rather than taken from `imagehash`,
which would bring PyWavelets and SciPy for the one hash we use. The near search compares each training
image with every evaluation hash (vectorised): fine for evaluation sets of up to ~10^5 images; a
billion-image check belongs in a distributed job with an index (LSH), not in `prepare`.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

DEDUP_REPORT = "dedup.json"  # prepare's report: duplicates within the training set and against eval sets

HASH_SIZE = 16  # 16 x 16 gradient bits: 256
BANDS = 8       # of 32 bits each, for the candidate lookup


def image_hashes(image: Image.Image | bytes) -> tuple[bytes, np.ndarray]:
    """(exact digest of the decoded pixels, difference hash as 4 uint64 words)."""
    if isinstance(image, bytes):
        with Image.open(io.BytesIO(image)) as opened:
            return image_hashes(opened.convert("RGB"))
    rgb = image.convert("RGB")
    exact = hashlib.blake2b(rgb.tobytes() + repr(rgb.size).encode(), digest_size=16).digest()
    gray = np.asarray(rgb.convert("L").resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (gray[:, 1:] > gray[:, :-1]).flatten()
    return exact, np.packbits(bits).view(np.uint64)


@dataclass
class EvalIndex:
    """The hashes of every evaluation set, and the duplicates found against them."""

    near_bits: int = 4
    exact: dict[bytes, str] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    _near: list[np.ndarray] = field(default_factory=list)
    _near_set: list[str] = field(default_factory=list)
    found: Counter = field(default_factory=Counter)   # (set, "exact" | "near") -> training images; near includes exact
    dropped: int = 0
    checked: int = 0   # training images compared (a remote set counted from sidecars is not read)
    _table: np.ndarray | None = None
    _bands: list[dict] = field(default_factory=list)

    def add(self, set_name: str, image: Image.Image | bytes) -> None:
        exact, near = image_hashes(image)
        if set_name not in self.names:
            self.names.append(set_name)
        self.exact.setdefault(exact, set_name)
        self._near.append(near)
        self._near_set.append(set_name)
        self._table = None

    def check(self, image: Image.Image | bytes) -> bool:
        """Count a training image's duplicates; True when it duplicates any evaluation image."""
        return self.check_many([image_hashes(image)])[0] if self.names else False

    def check_many(self, hashes: list[tuple[bytes, np.ndarray]]) -> list[bool]:
        """`check` for many training images at once."""
        if not self.names or not hashes:
            return [False] * len(hashes)
        self.checked += len(hashes)
        out = []
        for exact, near in hashes:
            hits = {(self._near_set[i], "near") for i in self._within(near)}
            if exact in self.exact:
                hits.add((self.exact[exact], "exact"))
            for hit in hits:
                self.found[hit] += 1
            out.append(bool(hits))
        return out

    def _within(self, near: np.ndarray) -> np.ndarray:
        """Evaluation hashes within `near_bits` of `near`. With fewer than 8 differing bits, one of the hash's
        8 bands of 32 bits matches exactly (pigeonhole): look candidates up by band, then measure them."""
        if self._table is None:
            self._table = np.stack(self._near)
            self._bands = [{} for _ in range(BANDS)]
            for index, words in enumerate(self._table.view(np.uint32)):
                for band, value in enumerate(words.tolist()):
                    self._bands[band].setdefault(value, []).append(index)
        if self.near_bits >= BANDS:
            candidates = np.arange(len(self._table))
        else:
            found = {i for band, value in enumerate(near.view(np.uint32).tolist()) for i in self._bands[band].get(value, ())}
            candidates = np.fromiter(found, dtype=np.int64, count=len(found))
        if not len(candidates):
            return candidates
        distance = np.bitwise_count(self._table[candidates] ^ near).sum(axis=1)
        return candidates[distance <= self.near_bits]

    def report(self) -> dict:
        return {
            "near_duplicate_bits": self.near_bits,
            "training_images_checked": self.checked,
            "dropped": self.dropped,
            "sets": {name: {"exact": self.found[(name, "exact")], "near": self.found[(name, "near")]}
                     for name in self.names},
        }

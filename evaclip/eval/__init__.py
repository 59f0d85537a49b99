"""Zero-shot evaluation: classification (class names x prompt templates) and image-text retrieval.

The classifier is built the standard way, by open_clip's `build_zero_shot_classifier`: for each class,
encode every template, normalize, average, renormalize. Metrics: top-1, top-5, mean per-class recall,
per-class accuracy and the confusion matrix; retrieval recall@1/5/10 both ways. Deterministic: no
augmentation, fixed order.
"""

from __future__ import annotations

import csv
import itertools
import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from open_clip import build_zero_shot_classifier
from open_clip.transform import MaybeToTensor
from torchvision.transforms import Compose, Normalize, ToTensor

from ..checkpoint import atomic_write_text, load_model_weights
from ..config import Params
from ..data.evalsets import EvalSet, load_eval_set
from ..errors import ConfigError
from ..model import create_model, create_transforms, get_tokenizer, pool_early
from ..precision import DTYPES, resolve_precision
from ..train.callbacks import BaseCallback


@dataclass
class SetResult:
    name: str
    path: str
    kind: str
    metrics: dict[str, float]
    classnames: list[str] = field(default_factory=list)
    per_class: list[float] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)
    identity: str = ""  # what promotion compares: the same files, classes and templates


@dataclass
class EvalResult:
    checkpoint: str
    sets: list[SetResult]
    output_dir: Path
    device: str = "cpu"
    dtype: str = "float32"  # what the model computed in (the training precision)

    @property
    def metrics(self) -> dict[str, float]:
        """Flat metrics; the first set's also without a prefix (they decide promotion)."""
        flat: dict[str, float] = {}
        for index, result in enumerate(self.sets):
            for key, value in result.metrics.items():
                flat[f"{result.name}/{key}"] = value
                if index == 0:
                    flat[key] = value
        return flat


def default_checkpoint(params: Params) -> Path:
    return params.eval.checkpoint or Path(params.train.output_dir) / "model.safetensors"


def evaluate(params: Params, checkpoint: str | Path | None = None, progress: bool = True) -> EvalResult:
    """Evaluate a checkpoint on every `eval.sets`; writes metrics.json, per-class CSVs and confusion PNGs."""
    checkpoint = Path(checkpoint or default_checkpoint(params))
    if not checkpoint.is_file():
        raise ConfigError(f"eval.checkpoint: {checkpoint} not found (run `evaclip train`)")
    sets = [load_eval_set(path, params.eval.templates) for path in params.eval.sets]  # fail before work
    model = create_model(params.model).eval()
    load_model_weights(model, checkpoint)
    pool_early(model)
    device, dtype = evaluation_device(params)
    model.to(device, dtype)
    _, preprocess = create_transforms(params.model.name)
    tokenizer = get_tokenizer(params.model.name)
    results = []
    for path, evalset in zip(params.eval.sets, sets, strict=True):
        run = zero_shot_classification if evalset.kind == "classification" else retrieval
        result = run(model, evalset, preprocess, tokenizer, params.eval.batch_size, progress)
        result.path, result.identity = str(path), evalset.identity
        results.append(result)
    out = EvalResult(str(checkpoint), results, Path(params.eval.output_dir), str(device),
                     str(next(model.parameters()).dtype).removeprefix("torch."))
    write_reports(out)
    return out


def evaluation_device(params: Params) -> tuple[torch.device, torch.dtype]:
    """Where and in what precision training ran: the first GPU if there is one, in `train.precision` (fp16
    only on a GPU: a model trained in fp16 is evaluated in fp32 on a CPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[resolve_precision(params.train.precision, device)]
    return device, torch.float32 if dtype == torch.float16 and device.type == "cpu" else dtype


def _batches(samples: Iterator, preprocess, batch_size: int, prefetch: int = 2):
    """Batches made in a background thread while the model encodes the previous ones: decoding and
    preprocessing (PIL and torch kernels, outside the GIL) overlap the forward passes. A thread, not
    DataLoader workers: the samples come from any generator, and one producer keeps up with a CPU model."""
    batches: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce():
        try:
            for batch in _plain_batches(samples, preprocess, batch_size):
                while not stop.is_set():
                    try:
                        batches.put(batch, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            batches.put(None)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            batches.put(error)

    producer = threading.Thread(target=produce, name="eval-batches", daemon=True)
    producer.start()
    try:
        while (item := batches.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def _plain_batches(samples: Iterator, preprocess, batch_size: int):
    per_image, to_batch = _split_tensor_tail(preprocess)
    images, targets = [], []
    for image, target in samples:
        images.append(per_image(image))
        targets.append(target)
        if len(images) == batch_size:
            yield to_batch(images), targets
            images, targets = [], []
    if images:
        yield to_batch(images), targets


_TO_TENSOR = (ToTensor, MaybeToTensor)


def _split_tensor_tail(preprocess):
    """(per-image steps, batch maker). A transform that ends in to-tensor + normalize (open_clip's) gets those
    two applied once per batch: the same arithmetic on every element, so the same values, without two small
    tensor ops per image (a third of the preprocessing CPU, which competes with the model for the cores)."""
    steps = getattr(preprocess, "transforms", None)
    if not (isinstance(preprocess, Compose) and len(steps) >= 2 and type(steps[-2]) in _TO_TENSOR
            and type(steps[-1]) is Normalize and not steps[-1].inplace):
        return preprocess, lambda images: torch.stack(images)
    per_image, normalize = Compose(steps[:-2]), steps[-1]
    mean = torch.tensor(normalize.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(normalize.std, dtype=torch.float32)[:, None, None]

    def to_batch(images):
        if any(getattr(image, "mode", None) != "RGB" for image in images):  # what ToTensor's fast path takes
            return torch.stack([normalize(ToTensor()(image)) for image in images])
        pixels = torch.from_numpy(np.stack([np.asarray(image) for image in images]))  # N, H, W, 3 uint8
        return pixels.permute(0, 3, 1, 2).float().div(255).sub(mean).div(std)

    return per_image, to_batch


@torch.no_grad()
def zero_shot_classification(model, evalset: EvalSet, preprocess, tokenizer, batch_size: int,
                             progress: bool = False, max_samples: int | None = None) -> SetResult:
    parameter = next(model.parameters())  # evaluate where and in what precision the model lives
    device, dtype = parameter.device, parameter.dtype
    templates = [t.replace("{c}", "{}") for t in evalset.templates]  # CLIP_benchmark's {c} -> format's {}
    classifier = build_zero_shot_classifier(model, tokenizer, evalset.classnames, templates, device=device,
                                            use_tqdm=progress).float()
    n = len(evalset.classnames)
    confusion = np.zeros((n, n), dtype=np.int64)
    top5 = total = 0
    samples = itertools.islice(evalset.samples(), max_samples)  # None: all
    for images, labels in _tqdm(_batches(samples, preprocess, batch_size), progress, evalset.name):
        features = torch.nn.functional.normalize(model.encode_image(images.to(device, dtype)).float(), dim=-1)
        logits = (features @ classifier).cpu()
        labels = torch.tensor(labels)
        ranked = logits.topk(min(5, n), dim=-1).indices
        top5 += (ranked == labels[:, None]).any(dim=-1).sum().item()
        total += len(labels)
        np.add.at(confusion, (labels.numpy(), ranked[:, 0].numpy()), 1)
    if total == 0:
        raise ConfigError(f"evaluation set {evalset.name}: no samples")
    per_class = (confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)).tolist()
    present = confusion.sum(axis=1) > 0
    metrics = {
        "zeroshot_top1": float(confusion.diagonal().sum() / total),
        "zeroshot_top5": float(top5 / total),
        "mean_per_class_recall": float(np.mean(np.array(per_class)[present])),
        "samples": float(total),
    }
    return SetResult(evalset.name, "", "classification", metrics, list(evalset.classnames), per_class,
                     confusion.tolist())


@torch.no_grad()
def retrieval(model, evalset: EvalSet, preprocess, tokenizer, batch_size: int, progress: bool = False) -> SetResult:
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    image_features, text_features, text_owner = [], [], []
    offset = 0
    for images, captions in _tqdm(_batches(evalset.samples(), preprocess, batch_size), progress, evalset.name):
        encoded = model.encode_image(images.to(device, dtype)).float()
        image_features.append(torch.nn.functional.normalize(encoded, dim=-1).cpu())
        for index, caption_list in enumerate(captions):
            encoded = model.encode_text(tokenizer(caption_list).to(device)).float()
            text_features.append(torch.nn.functional.normalize(encoded, dim=-1).cpu())
            text_owner += [offset + index] * len(caption_list)  # which image each caption describes
        offset += len(captions)
    images, texts = torch.cat(image_features), torch.cat(text_features)
    owner = torch.tensor(text_owner)
    similarity = images @ texts.T
    metrics = {}
    for k in (1, 5, 10):
        top_texts = similarity.topk(min(k, texts.shape[0]), dim=1).indices  # image -> text
        metrics[f"image_to_text_R@{k}"] = float((owner[top_texts] == torch.arange(len(images))[:, None]).any(1).float().mean())
        top_images = similarity.T.topk(min(k, images.shape[0]), dim=1).indices  # text -> image
        metrics[f"text_to_image_R@{k}"] = float((top_images == owner[:, None]).any(1).float().mean())
    metrics["samples"] = float(len(images))
    return SetResult(evalset.name, "", "retrieval", metrics)


def _tqdm(iterable, enabled: bool, name: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=f"eval {name}", unit="batch", mininterval=2.0)


def write_reports(result: EvalResult) -> None:
    out = result.output_dir
    out.mkdir(parents=True, exist_ok=True)
    summary = {"checkpoint": result.checkpoint, "device": result.device, "dtype": result.dtype,
               "metrics": result.metrics,
               "sets": [{"name": s.name, "path": s.path, "kind": s.kind, "metrics": s.metrics} for s in result.sets]}
    atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
    for s in result.sets:
        if s.kind != "classification":
            continue
        with open(out / f"{s.name}_per_class.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["class", "accuracy", "samples"])
            for name, accuracy, row in zip(s.classnames, s.per_class, s.confusion, strict=True):
                writer.writerow([name, f"{accuracy:.6f}", sum(row)])
        plot_confusion(s, out / f"{s.name}_confusion.png")


def plot_confusion(result: SetResult, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # a minimal install (benchmarks/gpu_check.sh): the CSV holds the same numbers
        print(f"matplotlib is not installed: no {path.name}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.array(result.confusion, dtype=float)
    matrix = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    n = len(result.classnames)
    fig, ax = plt.subplots(figsize=(max(4, n * 0.5 + 2), max(4, n * 0.5 + 1.5)))
    image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n), result.classnames, rotation=90, fontsize=7)
        ax.set_yticks(range(n), result.classnames, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{result.name}: zero-shot top-1 {result.metrics['zeroshot_top1']:.3f}")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class PeriodicEvaluation(BaseCallback):
    """A training callback (rank 0): zero-shot top-1/top-5 on the first evaluation set every N steps.

    It adds `eval_<metric>` to that step's metrics, so the metrics file and MLflow get them too. Put it
    before the callbacks that record metrics.
    """

    def __init__(self, params: Params):
        self.params, self.every = params, params.eval.every_n_steps
        self.evalset = load_eval_set(params.eval.sets[0], params.eval.templates)
        _, self.preprocess = create_transforms(params.model.name)
        self.tokenizer = get_tokenizer(params.model.name)

    def on_train_start(self, info):
        self.model = info["model"]

    def on_step(self, step, metrics):
        if self.every and step % self.every == 0 and self.evalset.kind == "classification":
            was_training = self.model.training
            started = time.perf_counter()
            self.model.eval()
            try:
                result = zero_shot_classification(self.model, self.evalset, self.preprocess, self.tokenizer,
                                                  self.params.eval.batch_size,
                                                  max_samples=self.params.eval.every_n_steps_samples)
            finally:
                self.model.train(was_training)
            metrics.update({f"eval_{k}": v for k, v in result.metrics.items()})  # eval_samples: the subset's size
            metrics["eval_seconds"] = time.perf_counter() - started  # what a training time can leave out

"""The configuration: one typed tree, read from `params.yaml` (which DVC tracks too).

`load_params(path, overrides)` is the only way in. It fails before any work starts, with
an error that names the file and the key path, when the file is missing, a key is unknown,
or a value has the wrong type.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"  # package data: works from a wheel


# A local path or a URL kept as written: pathlib would turn `s3://b/x` into `s3:/b/x`.
Location = Annotated[str, BeforeValidator(lambda value: str(value) if isinstance(value, Path) else value)]


class _Section(BaseModel):
    # Unknown keys are errors: a typo must never silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True)


class ModelConfig(_Section):
    name: str = Field("evaclip-demo", description="open_clip model config: one of ours or open_clip's")
    token_masking: float = Field(0.0, description="fraction of image tokens dropped in training (FLIP)")
    attention: Literal["sdpa", "flash_attn", "math"] = "sdpa"
    grad_checkpointing: bool = False

    @field_validator("token_masking")
    @classmethod
    def _masking_in_range(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError("must be in [0, 1): the CLS token and at least one patch are always kept")
        return value


class InitConfig(_Section):
    vision: Optional[Path] = Field(None, description="EVA / EVA-02 weights for the vision tower")
    vision_format: Literal["auto", "timm", "eva", "clip"] = "auto"
    text: Optional[Path] = Field(None, description="OpenAI CLIP or open_clip weights for the text tower")
    text_format: Literal["auto", "openai", "open_clip", "hf"] = "auto"
    trust_torchscript: bool = Field(False, description="read TorchScript archives (OpenAI's .pt): they can run code")
    allow_missing: list[str] = Field(
        default_factory=list,
        description="glob patterns of model keys you accept to start from random init",
    )
    output_dir: Path = Path("outputs/init")
    seed: int = 0


DEFAULT_CAPTION_TEMPLATES = [
    "a photo of a {}.",
    "a product photo of a {}.",
    "a grayscale photo of a {}.",
    "a {} on a plain background.",
    "an image showing a {}.",
]


class MixEntry(_Section):
    """One shard set of a training mixture (EVA-CLIP's train-data list)."""

    path: Location = Field(..., description="a prepared shard set (a folder with manifest.json), or shards to index "
                                            "in place: s3://bucket/laion/{000000..199999}.tar, https://..., a folder")
    weight: float = Field(1.0, gt=0, description="relative sampling probability")
    name: Optional[str] = Field(None, description="what metrics call it (data/share/<name>); default: mix<i>")


class DataConfig(_Section):
    source: Literal["fashion_mnist", "image_folder", "pairs", "wds"] = "fashion_mnist"
    path: Optional[Location] = Field(None, description="the source; fashion_mnist: the Debian package's folder, "
                                                       "imported by data.dvc as data/ (what dvc.yaml's prepare watches); "
                                                       "wds: shards in place, local or s3://, https://, pipe:")
    image_column: str = "image"          # pairs from CSV/Parquet
    caption_column: str = "caption"
    caption_templates: list[str] = Field(default_factory=lambda: list(DEFAULT_CAPTION_TEMPLATES))
    eval_path: Optional[Path] = Field(None, description="a zero-shot evaluation set to version beside the shards")
    output_dir: Path = Path("outputs/data")
    samples_per_shard: int = Field(5000, gt=0)
    max_skipped_fraction: float = Field(0.01, ge=0, le=1, description="of samples (prepare) and of shards (training)")
    dedup_against_eval: bool = Field(False, description="drop training images that duplicate an evaluation image "
                                                        "(exact or perceptual hash); counted either way")
    near_duplicate_bits: int = Field(4, ge=0, le=64, description="difference hashes (256 bits) this close are duplicates")
    version: bool = Field(True, description="the pipeline saves each run as a DVC experiment and pushes to the remote")
    remote: Optional[str] = Field(None, description="DVC remote to push to; default: the repository's default")
    seed: int = 0
    # The training loader
    mix: list[MixEntry] = Field(default_factory=list, description="shard sets to mix; default: output_dir/train")
    resampled: bool = Field(False, description="infinite with-replacement shard sampling (multi-node safe)")
    shuffle_buffer: int = Field(2000, ge=0)
    workers: int = Field(2, ge=0)
    samples_per_epoch: Optional[int] = Field(None, gt=0, description="default: the shard sets' total")
    read_retries: int = Field(3, ge=0, description="attempts after a shard fails to open or to read, then it is skipped")
    retry_delay: float = Field(1.0, ge=0, description="seconds before the first retry, doubled at each next one")

    @field_validator("mix")
    @classmethod
    def _mix_names_differ(cls, mix: list[MixEntry]) -> list[MixEntry]:
        names = [m.name or f"mix{i}" for i, m in enumerate(mix)]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"entries share the name(s) {twice}: each shard set needs its own (its manifest's folder)")
        return mix

    @field_validator("caption_templates")
    @classmethod
    def _templates_have_a_slot(cls, templates: list[str]) -> list[str]:
        bad = [t for t in templates if t.count("{}") != 1]
        if not templates or bad:
            raise ValueError(f"each template needs exactly one '{{}}' for the class name: {bad or 'none given'}")
        return templates


class KubernetesConfig(_Section):
    """`train.launcher: trainjob`: the run as one Kubeflow Trainer TrainJob of train.nodes pods."""

    namespace: str = "default"
    image: Optional[str] = Field(None, description="the evaclip image (docker/Dockerfile); default: $EVACLIP_IMAGE")
    runtime: str = Field("torch-distributed", description="the ClusterTrainingRuntime (Kubeflow Trainer v2)")
    volumes: dict[str, str] = Field(
        default_factory=dict, description="mount path -> PersistentVolumeClaim, e.g. /app/outputs: evaclip-outputs "
                                          "(ReadWriteMany: the pipeline's pod mounts it too and reads the model there)")
    env_from_secrets: list[str] = Field(
        default_factory=list, description="SECRET:KEY entries: a Secret's key the pods get as the variable KEY "
                                          "(AWS_ACCESS_KEY_ID, MLFLOW_TRACKING_PASSWORD, ...)")
    service_account: Optional[str] = None
    cpu: Optional[str] = Field(None, description="per node, e.g. '96'")
    memory: Optional[str] = Field(None, description="per node, e.g. '1000Gi'")
    shm_size: str = Field("64Gi", description="/dev/shm of each pod (DataLoader workers, NCCL)")
    poll_seconds: float = Field(10.0, gt=0)


class TrainConfig(_Section):
    optimizer: Literal["lamb", "adamw"] = "lamb"
    lr: float = Field(5e-4, gt=0, description="learning rate of parameters outside both towers")
    visual_lr: Optional[float] = Field(None, gt=0, description="vision tower; defaults to lr")
    text_lr: Optional[float] = Field(None, gt=0, description="text tower; defaults to lr")
    weight_decay: float = Field(0.05, ge=0)
    visual_weight_decay: Optional[float] = Field(None, ge=0)
    text_weight_decay: Optional[float] = Field(None, ge=0)
    visual_layer_decay: float = Field(1.0, gt=0, le=1)
    text_layer_decay: float = Field(1.0, gt=0, le=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.98, ge=0, lt=1)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(2000, ge=0)
    steps: int = Field(..., gt=0)
    batch_size: int = Field(..., gt=0, description="samples per device per step")
    devices: int = Field(1, gt=0, description="processes per node (GPUs, or CPU processes)")
    nodes: int = Field(1, gt=0)
    grad_accum_steps: int = Field(1, gt=0)
    grad_clip: Optional[float] = Field(5.0, gt=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "fp32", description="auto: bf16 where the hardware computes in it, else fp16 on GPUs, fp32 on CPUs")
    fp16_initial_scale_power: int = Field(16, ge=0, description="fp16 dynamic loss scale starts at 2^this")
    fp16_loss_scale_window: int = Field(1000, gt=0)
    fp16_hysteresis: int = Field(2, gt=0)
    zero_stage: int = Field(1, ge=0, le=2, description="DeepSpeed ZeRO stage: 0, 1 or 2")
    local_loss: bool = True                 # open_clip ClipLoss: logits of local features only
    gather_with_grad: bool = True           # gradients flow through the gathered features
    unmasked_tuning_steps: int = Field(0, ge=0, description="FLIP: last N steps without token masking")
    init_checkpoint: Optional[Path] = Field(None, description="default: init.output_dir/model.safetensors if present")
    output_dir: Path = Path("outputs/train")
    checkpoint_uri: Optional[Location] = Field(
        None, description="object storage for checkpoints (s3://bucket/prefix): each rank uploads its part after "
                          "every save, a resume downloads the latest; nodes need no shared filesystem")
    checkpoint_every: int = Field(100, gt=0, description="steps between checkpoints (and one at the end)")
    keep_checkpoints: int = Field(3, gt=0)
    resume: Union[bool, Literal["if_same"]] = Field(
        True, description="continue from the latest checkpoint in output_dir; if_same: only a checkpoint of the same "
                          "recipe, else start over (dvc.yaml's train stage)")
    max_nonfinite_steps: int = Field(10, ge=0, description="consecutive non-finite steps tolerated")
    log_every: int = Field(10, gt=0)
    launcher: Literal["torchrun", "deepspeed", "trainjob"] = Field(
        "torchrun", description="trainjob: submit the run to Kubernetes as a Kubeflow TrainJob (train.kubernetes)")
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)
    hostfile: Optional[Path] = Field(
        None, description="several nodes, launcher deepspeed: its hostfile, started from node 0 over pdsh/ssh; "
                          "without one every node runs `evaclip train --node-rank R` (DeepSpeed's --no_ssh)")
    rdzv_endpoint: Optional[str] = Field(
        None, description="several nodes: HOST:PORT of node 0 (torchrun's c10d rendezvous, DeepSpeed's master); "
                          "default: MASTER_ADDR / MASTER_PORT from the environment (set by Kubernetes operators)")
    seed: int = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.devices * self.nodes * self.grad_accum_steps

    @field_validator("checkpoint_uri")
    @classmethod
    def _object_storage(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and ("://" not in value or value.startswith(("file://", "pipe:"))):
            raise ValueError(f"{value!r} is not an object-storage URL (s3://bucket/prefix); "
                             "for a local folder use train.output_dir")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _tuning_fits(self) -> TrainConfig:
        if self.unmasked_tuning_steps > self.steps:
            raise ValueError(f"unmasked_tuning_steps ({self.unmasked_tuning_steps}) exceeds steps ({self.steps})")
        return self


class EvalConfig(_Section):
    sets: list[Path] = Field(default_factory=lambda: [Path("outputs/data/eval/fashion_mnist")],
                             description="evaluation sets (see evaclip.data.evalsets); the first decides promotion")
    templates: Optional[str] = Field(None, description="openai | simple | a file; default: each set's own")
    checkpoint: Optional[Path] = Field(None, description="default: train.output_dir/model.safetensors")
    batch_size: int = Field(256, gt=0)
    every_n_steps: int = Field(0, ge=0, description="also evaluate during training (0: only at the end)")
    every_n_steps_samples: Optional[int] = Field(
        None, gt=0, description="evaluations during training use the first N samples of the first set (null: all): "
                                "a cheaper learning curve, on a fixed subset")
    output_dir: Path = Path("outputs/eval")


class PretrainConfig(_Section):
    """EVA-style masked image modelling of the vision tower (`evaclip pretrain`); hardware from train.*."""

    teacher: Optional[str] = Field(None, description="a CLIP weight file, or models:/NAME@ALIAS from the registry")
    teacher_model: Optional[str] = Field(None, description="a teacher file's model config; default: model.name")
    resample_teacher: bool = Field(True, description="resample a teacher feature grid unlike the student's; false: refuse")
    mask_ratio: float = Field(0.4, gt=0, lt=1, description="fraction of patches masked, block-wise")
    min_block_patches: int = Field(4, ge=1)
    steps: int = Field(200, gt=0)
    batch_size: int = Field(128, gt=0, description="samples per device per step")
    lr: float = Field(1.5e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(20, ge=0)
    output_dir: Path = Path("outputs/pretrain")
    seed: int = 0


class TrackingConfig(_Section):
    enabled: bool = Field(True, description="false: train and evaluate without MLflow (nothing logged or registered)")
    uri: Optional[str] = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or sqlite")
    default_store: Path = Field(Path("outputs/mlflow"), description="SQLite file and artifacts when no URI is set")
    experiment: str = "evaclip"
    registered_model: Optional[str] = Field(None, description="default: evaclip-<model.name> (one per architecture)")
    promotion_metric: str = "zeroshot_top1"
    promotion_margin: float = Field(0.0, ge=0, description="a challenger must beat the champion by this much")
    guard_metrics: list[str] = Field(default_factory=lambda: ["zeroshot_top1", "image_to_text_R@1", "text_to_image_R@1"],
                                     description="compared on every other evaluation set both models were evaluated on")
    guard_margin: float = Field(0.02, ge=0, description="a challenger losing more than this on any guard metric "
                                                        "of another evaluation set is not promoted")
    retries: int = Field(6, ge=0, description="attempts to reach a tracking server before giving up (backoff 2, 4 .. "
                                               "64 s: about 2 minutes with 6, what a server's restart takes)")
    flush_timeout_s: float = Field(600, ge=0, description="at the end of training, how long rank 0 waits for a tracking "
                                                          "server that went away to take its kept metrics")


class Params(_Section):
    """Everything one pipeline run needs.

    A few rules span sections: they are checked here so that they fail before any work.
    """

    profile: str = Field("custom", description="name of the profile these values came from")
    model: ModelConfig = Field(default_factory=ModelConfig)
    init: InitConfig = Field(default_factory=InitConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _eval_on_logged_steps(self) -> Params:
        every, log_every = self.eval.every_n_steps, self.train.log_every
        if every and every % log_every:
            raise ValueError(f"eval.every_n_steps ({every}) must be a multiple of train.log_every ({log_every}): "
                             "evaluation during training runs on logged steps")
        return self


def profile_path(name: str) -> Path:
    """The file of a named profile (`evaclip/profiles/<name>.yaml`)."""
    path = PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        available = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))) or "none"
        raise ConfigError(f"unknown profile {name!r}: available profiles are {available} (in {PROFILES_DIR})")
    return path


def load_params(path: str | Path = "params.yaml", overrides: Sequence[str] = ()) -> Params:
    """Read a params file, apply `key.path=value` overrides, and validate the result."""
    path = Path(path)
    raw = _read_yaml(path)
    for override in overrides:
        _apply_override(raw, override, path)
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe_validation_error(err, path, overrides)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found (pass --params, or --profile NAME)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    return raw


def _apply_override(raw: dict[str, Any], override: str, path: Path) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected KEY.PATH=VALUE, e.g. -s train.lr=1e-3")
    parts = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"override {override!r}: {where} in {path} is a value, not a section")
        node = child
    # YAML parsing gives `1e-3` a float, `true` a bool and `[a, b]` a list, as in the file itself.
    value = _parse_value(text)
    if any(str(v).lstrip().startswith("pipe:") for v in _leaves(value)):
        # Overrides arrive from the Prefect form and the command line: a pipe: would run a shell command on
        # the worker. Such commands come from a params file, which is reviewed and versioned.
        raise ConfigError(f"override {override!r}: pipe: locations are accepted from a params file only")
    node[parts[-1]] = value


def _leaves(value: Any) -> list:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _parse_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # PyYAML reads `1e-3` as a string (YAML 1.1 wants a dot); users mean a number.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _describe_validation_error(err: ValidationError, path: Path, overrides: Sequence[str]) -> str:
    lines = [f"{path}: invalid configuration ({err.error_count()} problem(s))"]
    for problem in err.errors():
        loc = tuple(part for part in problem["loc"] if not isinstance(part, int))
        key_path = ".".join(str(part) for part in loc)
        origin = next((f" [set by -s {o}]" for o in overrides if o.partition("=")[0].strip() == key_path), "")
        if problem["type"] == "extra_forbidden":
            lines.append(f"  {key_path}: unknown key{_suggestion(loc)}{origin}")
        elif problem["type"] == "missing":
            lines.append(f"  {key_path}: required key is missing")
        else:
            lines.append(f"  {key_path}: {problem['msg']} (got {problem.get('input')!r}){origin}")
    return "\n".join(lines)


def _suggestion(loc: tuple) -> str:
    """' (did you mean ...?)' from the valid keys of the section that holds the unknown key."""
    section: type[BaseModel] = Params
    for part in loc[:-1]:
        field = section.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        section = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(section.model_fields)})"

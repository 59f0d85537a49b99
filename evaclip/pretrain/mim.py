"""The pieces of EVA-02's masked image modelling: a student that sees masked patches as a learned mask
token, a frozen CLIP teacher whose patch features are the targets, and the loss.

EVA-02: `x = x * (1 - w) + mask_token * w` before the position embeddings (masked patches are
replaced, not dropped), a linear head on the student's patch tokens predicting the teacher's
features, and the negative cosine similarity on the masked positions only.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_model_weights
from ..config import ModelConfig, Params
from ..errors import CheckpointError, ConfigError
from ..model import create_model, set_token_masking


class MIMStudent(nn.Module):
    """The vision tower of `model_name` (a timm EVA-02), plus a mask token and a regression head."""

    def __init__(self, model_name: str, teacher_dim: int):
        super().__init__()
        clip = create_model(ModelConfig(name=model_name))  # the same tower init will load the result into
        self.trunk = clip.visual.trunk
        set_token_masking(clip, 0.0)  # MIM replaces masked patches; nothing is dropped
        self.trunk.reset_classifier(0)  # no CLIP projection while pre-training
        dim = self.trunk.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.lm_head = nn.Linear(dim, teacher_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.lm_head.weight, std=0.02)
        nn.init.zeros_(self.lm_head.bias)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.trunk.patch_embed.grid_size)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted teacher features of every patch, [B, H*W, teacher_dim]; `mask` is [B, H*W], True: masked."""
        trunk = self.trunk
        x = trunk.patch_embed(images)
        w = mask.unsqueeze(-1).to(x.dtype)
        x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        x, rope = trunk._pos_embed(x)
        x = trunk.norm_pre(x)
        for block in trunk.blocks:
            x = block(x, rope=rope)
        x = trunk.norm(x)
        return self.lm_head(x[:, trunk.num_prefix_tokens:])

    def eva_state_dict(self) -> dict[str, torch.Tensor]:
        """The checkpoint as MIM checkpoints are laid out: the tower's keys, `mask_token`, `lm_head.*`."""
        state = {k: v for k, v in self.trunk.state_dict().items()}
        state["mask_token"] = self.mask_token.detach()
        state.update({f"lm_head.{k}": v for k, v in self.lm_head.state_dict().items()})
        return {k: v.detach().float().contiguous() for k, v in state.items()}


class Teacher(nn.Module):
    """A frozen CLIP vision tower; `forward` gives its normalized patch features on the student's grid."""

    def __init__(self, trunk: nn.Module, student_grid: tuple[int, int], resample: bool, source: str):
        super().__init__()
        self.trunk = trunk.eval().requires_grad_(False)
        self.grid = tuple(trunk.patch_embed.grid_size)
        self.image_size = tuple(trunk.patch_embed.img_size)
        if self.grid != tuple(student_grid) and not resample:
            raise ConfigError(
                f"pretrain.teacher: {source} has a {self.grid[0]}x{self.grid[1]} feature grid, the student "
                f"{student_grid[0]}x{student_grid[1]}; set pretrain.resample_teacher=true to resample its "
                "features, or choose a teacher with the student's grid"
            )
        self.student_grid = tuple(student_grid)

    @property
    def dim(self) -> int:
        return self.trunk.embed_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.image_size:
            images = F.interpolate(images, size=self.image_size, mode="bicubic", align_corners=False)
        tokens = self.trunk.forward_features(images)[:, self.trunk.num_prefix_tokens:]
        if self.grid != self.student_grid:
            batch, _, dim = tokens.shape
            grid = tokens.transpose(1, 2).reshape(batch, dim, *self.grid)
            grid = F.interpolate(grid, size=self.student_grid, mode="bilinear", align_corners=False)
            tokens = grid.flatten(2).transpose(1, 2)
        return F.layer_norm(tokens.float(), (tokens.shape[-1],))  # EVA-02 regresses normalized features


def mim_loss(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity on the masked positions (1 - cos, so 0 is perfect)."""
    cosine = F.cosine_similarity(predicted.float()[mask], target[mask], dim=-1)
    return (1 - cosine).mean()


def load_teacher(params: Params, student_grid: tuple[int, int]) -> Teacher:
    """The teacher named by `pretrain.teacher`: a CLIP weight file, or `models:/NAME@ALIAS` (MLflow)."""
    spec = params.pretrain.teacher
    if not spec:
        raise ConfigError("pretrain.teacher: no teacher: give a CLIP weight file or models:/NAME@champion")
    if spec.startswith("models:/"):
        clip = _registered_clip(params, spec)
    else:
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"pretrain.teacher: weight file {path} not found")
        clip = create_model(ModelConfig(name=params.pretrain.teacher_model or params.model.name))
        try:
            load_model_weights(clip, path)
        except CheckpointError as err:
            raise CheckpointError(f"pretrain.teacher: {err} (is pretrain.teacher_model its architecture?)") from None
    set_token_masking(clip, 0.0)
    return Teacher(clip.visual.trunk, student_grid, params.pretrain.resample_teacher, spec)


def _registered_clip(params: Params, uri: str) -> nn.Module:
    """A registered model's open_clip export (what `evaclip evaluate` logs), built by open_clip itself."""
    import mlflow
    import open_clip

    from ..model.factory import _register_configs
    from ..tracking.store import connect

    connect(params)
    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except mlflow.exceptions.MlflowException as err:
        raise ConfigError(f"pretrain.teacher: {uri} cannot be loaded from the registry: {err.message}") from None
    configs = sorted(folder.rglob("open_clip_config.json"))
    if not configs:
        raise CheckpointError(f"pretrain.teacher: {uri} holds no open_clip export (open_clip_config.json)")
    _register_configs()
    return open_clip.create_model(f"local-dir:{configs[0].parent}", device="cpu")

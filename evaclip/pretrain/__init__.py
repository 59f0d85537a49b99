"""`evaclip pretrain`: EVA weights made the way EVA makes them, by masked image modelling of an EVA-02
vision tower against a CLIP teacher's features (EVA-01 regressed OpenAI CLIP's, EVA-02 an EVA-CLIP's).

The output (`pretrain.output_dir/eva.safetensors`) is laid out as MIM checkpoints are, mask token and
regression head included; `evaclip init` loads it into a CLIP vision tower with those keys dropped.
"""

from .engine import CHECKPOINT, PretrainResult, pretrain
from .masking import block_mask
from .mim import MIMStudent, Teacher, load_teacher, mim_loss

__all__ = ["CHECKPOINT", "MIMStudent", "PretrainResult", "Teacher", "block_mask", "load_teacher", "mim_loss", "pretrain"]

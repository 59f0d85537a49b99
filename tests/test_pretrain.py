"""`evaclip pretrain`: block masking, the teacher, and a few real pre-training steps (2 DeepSpeed CPU
processes) whose EVA checkpoint `evaclip init` loads into a CLIP vision tower."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from evaclip.checkpoint import write_state_dict
from evaclip.config import ModelConfig, load_params
from evaclip.errors import ConfigError
from evaclip.init import initialize
from evaclip.model import create_model
from evaclip.pretrain import MIMStudent, block_mask, load_teacher, mim_loss
from evaclip.train import launch

from .conftest import REPO
from .test_data import red_blue_pairs


def test_block_masks_cover_the_ratio_exactly_in_blocks():
    generator = torch.Generator().manual_seed(0)
    masks = [block_mask((8, 8), 0.4, generator) for _ in range(50)]
    assert all(int(m.sum()) == round(0.4 * 64) for m in masks)
    grids = torch.stack(masks).view(-1, 8, 8)
    # Blocks, not scattered patches: most masked patches have a masked neighbour to their right or below.
    right = grids[:, :, :-1] & grids[:, :, 1:]
    below = grids[:, :-1, :] & grids[:, 1:, :]
    assert (right.sum() + below.sum()) / grids.sum() > 0.6
    again = block_mask((8, 8), 0.4, torch.Generator().manual_seed(0))
    assert torch.equal(again, masks[0])  # deterministic per seed


def test_masked_patches_become_the_mask_token_and_only_they_count():
    torch.manual_seed(0)
    student = MIMStudent("evaclip-micro", teacher_dim=8)
    images = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :6] = True
    out = student(images, mask)
    assert out.shape == (2, 16, 8)
    changed = images.clone()
    changed[:, :, :8, :8] += 5  # pixels of patch 0 only, which is masked: the student cannot see them
    assert torch.allclose(student(changed, mask), out, atol=1e-5)
    target = torch.randn(2, 16, 8)
    assert torch.isclose(mim_loss(target, target, mask), torch.tensor(0.0), atol=1e-6)


def test_a_teacher_with_another_grid_is_resampled_or_refused(tmp_path):
    torch.manual_seed(0)
    teacher_file = write_state_dict(create_model(ModelConfig(name="evaclip-demo")).state_dict(), tmp_path / "t.safetensors")
    base = [f"pretrain.teacher={teacher_file}", "pretrain.teacher_model=evaclip-demo", "model.name=evaclip-micro"]
    params = load_params(REPO / "params.yaml", base)
    teacher = load_teacher(params, (4, 4))  # demo: 8x8 patches; micro: 4x4
    assert teacher(torch.randn(2, 3, 32, 32)).shape == (2, 16, 192)
    refusing = load_params(REPO / "params.yaml", [*base, "pretrain.resample_teacher=false"])
    with pytest.raises(ConfigError, match="8x8 feature grid, the student 4x4"):
        load_teacher(refusing, (4, 4))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pretraining_steps_give_an_eva_checkpoint_that_init_loads(tmp_path):
    torch.manual_seed(0)
    teacher_file = write_state_dict(create_model(ModelConfig(name="evaclip-micro")).state_dict(), tmp_path / "t.safetensors")
    source = red_blue_pairs(tmp_path / "pairs", 64)
    from evaclip.data import prepare

    params = load_params(REPO / "params.yaml", [
        "model.name=evaclip-micro", "data.source=pairs", f"data.path={source}", f"data.output_dir={tmp_path / 'data'}",
        "data.version=false", "data.samples_per_shard=16", "data.workers=0", "train.devices=2", "train.log_every=1",
        f"pretrain.teacher={teacher_file}", "pretrain.steps=6", "pretrain.batch_size=8", "pretrain.warmup_steps=1",
        f"pretrain.output_dir={tmp_path / 'pretrain'}", f"init.output_dir={tmp_path / 'init'}",
        f"init.vision={tmp_path / 'pretrain' / 'eva.safetensors'}", f"tracking.default_store={tmp_path / 'mlflow'}",
    ])
    prepare(params)
    checkpoint = launch(params, stage="pretrain")

    eva = load_file(str(checkpoint))
    assert "mask_token" in eva and "lm_head.weight" in eva  # as real MIM checkpoints are
    rows = [json.loads(line) for line in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(0 <= r["loss"] <= 2 for r in rows)

    result = initialize(params)  # no allow_missing: every vision key must come from the file
    counts = result.report.counts()
    dropped = set(result.report.keys("dropped"))
    assert {"mask_token", "lm_head.weight", "lm_head.bias"} <= dropped
    assert not any(k.startswith("visual.trunk.") and not k.startswith("visual.trunk.head.")  # the CLIP projection
                   for k in result.report.keys("new"))
    assert counts["loaded"] > 0
    model = load_file(str(result.checkpoint))
    assert torch.equal(model["visual.trunk.blocks.0.attn.q_proj.weight"], eva["blocks.0.attn.q_proj.weight"])

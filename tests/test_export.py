"""`evaclip export`: a folder open_clip loads by itself, giving the same embeddings as our model."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from evaclip.checkpoint import load_model_weights
from evaclip.cli import app
from evaclip.errors import CheckpointError
from evaclip.export import export_open_clip
from evaclip.init import initialize
from evaclip.model import create_model, create_transforms, get_tokenizer

from .conftest import REPO


@pytest.fixture
def checkpoint(params, eva_mim_checkpoint):
    path, _ = eva_mim_checkpoint
    update = {"init": params.init.model_copy(update={"vision": path})}
    return initialize(params.model_copy(update=update)).checkpoint


def _images(n=4):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).convert("RGB") for _ in range(n)]


def _our_embeddings(params, checkpoint, images, texts):
    model = create_model(params.model).eval()
    load_model_weights(model, checkpoint)
    _, preprocess = create_transforms(params.model.name)
    with torch.no_grad():
        pixels = torch.stack([preprocess(im) for im in images])
        return model.encode_image(pixels), model.encode_text(get_tokenizer(params.model.name)(texts))


@pytest.mark.parametrize("how", ["local-dir", "config+pretrained"])
def test_open_clip_loads_the_export_and_gives_the_same_embeddings(params, checkpoint, tmp_path, how):
    result = export_open_clip(params, checkpoint, tmp_path / "export")
    if how == "local-dir":
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{result.directory}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{result.directory}")
    else:
        open_clip.add_model_config(result.directory / f"{result.model_name}.json")
        model, _, preprocess = open_clip.create_model_and_transforms(result.model_name, pretrained=str(result.weights))
        tokenizer = open_clip.get_tokenizer(result.model_name)
    model.eval()
    images, texts = _images(), ["a photo of a sandal.", "a photo of a bag."]
    with torch.no_grad():
        theirs_image = model.encode_image(torch.stack([preprocess(im) for im in images]))
        theirs_text = model.encode_text(tokenizer(texts))
    ours_image, ours_text = _our_embeddings(params, checkpoint, images, texts)
    torch.testing.assert_close(theirs_image, ours_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs_text, ours_text, rtol=0, atol=1e-5)


def test_export_refuses_a_checkpoint_of_the_wrong_shape(params, tmp_path):
    bad = tmp_path / "bad.safetensors"
    state = create_model(params.model).state_dict()
    state["visual.trunk.pos_embed"] = torch.zeros(1, 50, 192)
    del state["logit_scale"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad))
    with pytest.raises(CheckpointError) as info:
        export_open_clip(params, bad, tmp_path / "export")
    assert "missing: logit_scale" in str(info.value)
    assert "shape: visual.trunk.pos_embed is (1, 50, 192) in the file, (1, 65, 192) in the model" in str(info.value)
    assert not (tmp_path / "export").exists()


def test_cli_export(checkpoint, tmp_path):
    out = tmp_path / "cli-export"
    result = CliRunner().invoke(app, ["export", str(checkpoint), "--out", str(out), "-p", str(REPO / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert f"local-dir:{out}" in result.output.replace("\n", "")
    assert (out / "open_clip_config.json").is_file() and (out / "open_clip_model.safetensors").is_file()

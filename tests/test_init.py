"""EVA weight initialization from the real published key layouts: every tensor lands where it belongs."""

from __future__ import annotations

import json
import zipfile

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from evaclip.checkpoint import read_state_dict
from evaclip.cli import app
from evaclip.errors import CheckpointError, ConfigError
from evaclip.init import initialize, initialize_model

from .conftest import REPO, randomized, to_eva_layout


def _with(params, **init):
    return params.model_copy(update={"init": params.init.model_copy(update=init)})


def _assert_tower_equal(model_state, source, prefix, skip=()):
    for key, value in source.items():
        if key in skip:
            continue
        torch.testing.assert_close(model_state[prefix + key], value, rtol=0, atol=0, msg=key)


# --- vision tower ------------------------------------------------------------------------------

def test_timm_safetensors_with_a_clip_projection_loads_every_tensor(params, tmp_path):
    timm_state = randomized(timm.create_model("eva02_demo_patch4_clip_32", num_classes=128).state_dict())
    path = tmp_path / "eva02_demo.safetensors"
    save_file(timm_state, str(path))

    model, report = initialize_model(_with(params, vision=path))
    _assert_tower_equal(model.state_dict(), timm_state, "visual.trunk.")
    assert report.sources["vision"] == {"path": str(path), "format": "timm"}
    assert report.counts()["loaded"] == len(timm_state)


def test_original_eva02_mim_checkpoint_is_renamed_resampled_and_stripped(params, eva_mim_checkpoint):
    path, timm_state = eva_mim_checkpoint
    model, report = initialize_model(_with(params, vision=path))
    state = model.state_dict()

    # Renamed tensors (inner_attn_ln, ffn_ln, w1/w2/w3, q_bias/v_bias) land unchanged.
    _assert_tower_equal(state, timm_state, "visual.trunk.", skip={"pos_embed", "patch_embed.proj.weight"})
    # Patch 6 -> 4 and grid 7x7 -> 8x8 are resampled, and reported.
    reshaped = {r.key: r for r in report.records if r.status == "reshaped"}
    assert reshaped["visual.trunk.pos_embed"].source_shape == [1, 50, 192]
    assert reshaped["visual.trunk.pos_embed"].shape == [1, 65, 192]
    assert reshaped["visual.trunk.patch_embed.proj.weight"].source_shape == [192, 3, 6, 6]
    torch.testing.assert_close(state["visual.trunk.pos_embed"][:, 0], timm_state["pos_embed"][:, 0])  # CLS slot
    # MIM-only keys and rope buffers are dropped; the CLIP projection starts fresh; nothing else is missing.
    assert set(report.keys("dropped")) == {"mask_token", "lm_head.weight", "lm_head.bias", "rope.freqs_cos", "rope.freqs_sin"}
    assert set(report.keys("new")) == {"visual.trunk.head.weight", "visual.trunk.head.bias"}
    assert report.sources["vision"]["format"] == "eva"


@pytest.mark.parametrize("wrapper", ["model", "module", "model_ema", "state_dict"])
def test_eva_checkpoints_are_unwrapped(tmp_path, eva_mim_checkpoint, wrapper):
    path, _ = eva_mim_checkpoint
    inner = torch.load(path, weights_only=False)["model"]
    wrapped = tmp_path / f"{wrapper}.pt"
    torch.save({wrapper: inner, "epoch": 3}, wrapped)
    assert read_state_dict(wrapped).keys() == inner.keys()


@pytest.mark.parametrize("layout", ["open_clip", "eva_clip"])
def test_visual_part_of_a_clip_checkpoint(params, tmp_path, demo_model_state, layout):
    visual = {k[len("visual.trunk."):]: v for k, v in demo_model_state.items() if k.startswith("visual.trunk.")}
    if layout == "open_clip":
        checkpoint = dict(demo_model_state)  # visual.trunk.* + text.* + logit_scale, as open_clip saves
    else:  # the original EVA-CLIP files: visual.* in EVA key names, rope buffers included
        checkpoint = {"visual." + k: v for k, v in to_eva_layout(visual).items()}
        checkpoint["visual.rope.freqs_cos"] = torch.randn(64, 64)
        checkpoint.update({k: v for k, v in demo_model_state.items() if k.startswith("text.")})
    path = tmp_path / f"{layout}.pt"
    torch.save({"state_dict": checkpoint}, path)

    model, report = initialize_model(_with(params, vision=path))
    _assert_tower_equal(model.state_dict(), visual, "visual.trunk.")  # the projection head included
    assert report.sources["vision"]["format"] == "clip"
    assert report.keys("new") == []


# --- text tower --------------------------------------------------------------------------------

def _text_state(demo_model_state):
    return {k[len("text."):]: v for k, v in demo_model_state.items() if k.startswith("text.")}


def _openai_layout(text_state):
    # OpenAI's CLIP checkpoints: text keys at the top level, a 77-position context, the vision
    # tower beside them under visual.* and the temperature.
    state = {k: v for k, v in text_state.items() if k != "positional_embedding"}
    state["positional_embedding"] = torch.cat([text_state["positional_embedding"], torch.randn(45, 192)])
    state.update({"visual.conv1.weight": torch.randn(192, 3, 4, 4), "visual.proj": torch.randn(192, 128)})
    state["logit_scale"] = torch.tensor(4.6052)
    return state


def _hf_layout(text_state, layers=4):
    hf = {
        "text_model.embeddings.token_embedding.weight": text_state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": text_state["positional_embedding"],
        "text_model.final_layer_norm.weight": text_state["ln_final.weight"],
        "text_model.final_layer_norm.bias": text_state["ln_final.bias"],
        "text_projection.weight": text_state["text_projection"].T,
        "logit_scale": torch.tensor(4.6052),
    }
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                hf[f"text_model.encoder.layers.{i}.{theirs}.{kind}"] = text_state[f"{block}{ours}.{kind}"]
        for kind in ("weight", "bias"):
            q, k, v = text_state[f"{block}attn.in_proj_{kind}"].chunk(3)
            for name, part in zip("qkv", (q, k, v), strict=True):
                hf[f"text_model.encoder.layers.{i}.self_attn.{name}_proj.{kind}"] = part
    return hf


@pytest.mark.parametrize("layout", ["openai", "open_clip", "hf"])
def test_text_tower_from_clip_checkpoints(params, tmp_path, demo_model_state, layout):
    text_state = _text_state(demo_model_state)
    if layout == "openai":
        checkpoint = _openai_layout(text_state)
    elif layout == "open_clip":
        checkpoint = {k: v for k, v in demo_model_state.items()}
    else:
        checkpoint = _hf_layout(text_state)
    path = tmp_path / f"{layout}.safetensors"
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(path))

    model, report = initialize_model(_with(params, text=path))
    state = model.state_dict()
    _assert_tower_equal(state, text_state, "text.", skip={"text_projection"})
    assert report.sources["text"]["format"] == layout
    # As EVA-CLIP's --skip-list: the projection and the temperature start fresh.
    assert not torch.equal(state["text.text_projection"], text_state["text_projection"])
    assert set(report.keys("new")) == {"text.text_projection"}
    if layout == "openai":
        assert report.keys("reshaped") == ["text.positional_embedding"]  # 77 -> 32 positions


# --- the output, the report, and bad input -----------------------------------------------------

def test_initialize_writes_a_loadable_checkpoint_and_a_json_report(params, eva_mim_checkpoint):
    path, _ = eva_mim_checkpoint
    result = initialize(_with(params, vision=path))
    saved = load_file(str(result.checkpoint))
    assert torch.equal(saved["visual.trunk.blocks.0.mlp.fc1_g.weight"],
                       torch.load(path, weights_only=False)["model"]["blocks.0.mlp.w1.weight"])
    report = json.loads(result.report_path.read_text())
    assert report["counts"] == {"loaded": 130, "reshaped": 2, "new": 2, "dropped": 5}
    assert result.report_path.parent == result.checkpoint.parent


def test_weights_of_another_architecture_fail_listing_every_mismatch(params, tmp_path):
    wider = timm.create_model("eva02_demo_patch4_clip_32", embed_dim=256, num_heads=4, depth=7, num_classes=128)
    path = tmp_path / "wrong.safetensors"
    save_file(wider.state_dict(), str(path))
    with pytest.raises(CheckpointError) as info:
        initialize(_with(params, vision=path))
    message = str(info.value)
    assert "unexpected: blocks.6." not in message  # keys are named as the model names them
    assert "unexpected: visual.trunk.blocks.6.norm1.weight" in message
    assert "shape: visual.trunk.cls_token is (1, 1, 256) in the file, (1, 1, 192) in the model" in message
    assert not (params.init.output_dir / "model.safetensors").exists()  # nothing half-done is written


def test_missing_keys_fail_unless_allowed(params, tmp_path, demo_model_state):
    text_state = {k: v for k, v in demo_model_state.items() if k.startswith("text.") and "resblocks.3." not in k}
    path = tmp_path / "three_layers.safetensors"
    save_file(text_state, str(path))
    with pytest.raises(CheckpointError, match=r"missing: text\.transformer\.resblocks\.3\.ln_1\.weight"):
        initialize_model(_with(params, text=path))
    _, report = initialize_model(_with(params, text=path, allow_missing=["text.transformer.resblocks.3.*"]))
    assert "text.transformer.resblocks.3.ln_1.weight" in report.keys("new")


def test_a_pickle_that_needs_code_execution_is_refused(params, tmp_path, demo_model_state):
    path = tmp_path / "evil.pt"
    torch.save({"model": demo_model_state, "trainer": zipfile.ZipInfo("x")}, path)  # any non-allowed class
    with pytest.raises(CheckpointError, match="refused: this pickle needs code execution"):
        initialize_model(_with(params, vision=path))


def test_truncated_and_missing_files_are_named(params, tmp_path, eva_mim_checkpoint):
    path, _ = eva_mim_checkpoint
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt: not a readable PyTorch checkpoint"):
        initialize_model(_with(params, vision=truncated))
    with pytest.raises(ConfigError, match="init.text: weight file .*nope.pt not found"):
        initialize_model(_with(params, text=tmp_path / "nope.pt"))


def test_cli_init_prints_the_report_and_exits_3_on_a_mismatch(tmp_path, eva_mim_checkpoint):
    path, _ = eva_mim_checkpoint
    out = tmp_path / "cli"
    runner = CliRunner()
    ok = runner.invoke(app, ["init", "-p", str(REPO / "params.yaml"), "-s", f"init.vision={path}",
                             "-s", f"init.output_dir={out}"])
    assert ok.exit_code == 0, ok.output
    assert "130 loaded, 2 reshaped, 2 new, 5 dropped" in ok.output
    assert (out / "model.safetensors").is_file() and (out / "init_report.json").is_file()

    bad = tmp_path / "bad.safetensors"
    save_file({"blocks.0.norm1.weight": torch.zeros(3)}, str(bad))
    failed = runner.invoke(app, ["init", "-s", f"init.vision={bad}", "-s", f"init.output_dir={tmp_path / 'x'}"])
    assert failed.exit_code == 3
    assert "shape: visual.trunk.blocks.0.norm1.weight is (3,) in the file" in failed.output


def test_torchscript_archives_are_read_only_when_trusted(tmp_path):
    path = tmp_path / "ViT-B-16.pt"  # OpenAI's original files are TorchScript archives
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 3)), str(path))
    with pytest.raises(CheckpointError, match="refused: a TorchScript archive .* init.trust_torchscript=true"):
        read_state_dict(path)
    assert set(read_state_dict(path, trust_torchscript=True)) == {"weight", "bias"}

"""params.yaml and the profiles: validated before any work, errors that name the key and the file."""

from __future__ import annotations

import pytest
import yaml

from evaclip.config import PROFILES_DIR, load_params, profile_path
from evaclip.errors import ConfigError

from .conftest import REPO


def test_params_yaml_is_the_demo_profile():
    params = load_params(REPO / "params.yaml")
    demo = load_params(profile_path("demo"))
    assert params == demo
    assert params.profile == "demo"
    assert params.model.token_masking == 0.5 and params.train.optimizer == "lamb"
    assert params.train.devices == 2


@pytest.mark.parametrize("profile", sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
def test_every_profile_validates(profile):
    assert load_params(profile_path(profile)).profile == profile


def test_eva02_clip_b16_profile_has_the_published_recipe():
    b16 = load_params(profile_path("eva02-clip-b16"))
    train = b16.train
    assert b16.model.name == "EVA02-B-16"
    assert (train.optimizer, train.visual_lr, train.text_lr, train.lr) == ("lamb", 2e-4, 2e-5, 5e-4)
    assert (train.weight_decay, train.beta1, train.beta2, train.eps) == (0.05, 0.9, 0.98, 1e-6)
    assert (train.warmup_steps, train.grad_clip, train.precision, train.zero_stage) == (2000, 5.0, "fp16", 1)
    assert (train.visual_layer_decay, train.text_layer_decay) == (0.75, 0.75)
    assert train.global_batch_size == 131072


def test_profiles_cite_their_source():
    for path in PROFILES_DIR.glob("eva02-*.yaml"):
        assert "arXiv 2303.15389" in path.read_text(), path


def test_unknown_key_names_the_key_path_and_the_file(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"]["lrr"] = 1e-3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert str(path) in message
    assert "train.lrr: unknown key (did you mean 'lr'?)" in message
    assert info.value.exit_code == 2


def test_wrong_type_names_the_key_and_the_value():
    with pytest.raises(ConfigError, match=r"train\.steps: .*integer.*'many'.*\[set by -s train\.steps=many\]"):
        load_params(REPO / "params.yaml", ["train.steps=many"])


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_unknown_profile_lists_the_available_ones():
    with pytest.raises(ConfigError, match="eva02-clip-b16"):
        profile_path("eva02-clip-b32")


def test_overrides_parse_values_like_yaml():
    params = load_params(REPO / "params.yaml", [
        "train.lr=1e-3", "train.steps=7", "model.attention=math", "init.allow_missing=[text.*]",
        "model.grad_checkpointing=true",
    ])
    assert params.train.lr == pytest.approx(1e-3) and isinstance(params.train.lr, float)
    assert params.train.steps == 7
    assert params.model.attention == "math"
    assert params.init.allow_missing == ["text.*"]
    assert params.model.grad_checkpointing is True


@pytest.mark.parametrize("override, message", [
    ("model.token_masking=1.0", r"model\.token_masking: .*\[0, 1\)"),
    ("model.attention=xformers", r"model\.attention: .*'sdpa', 'flash_attn' or 'math'"),
    ("train.zero_stage=3", r"train\.zero_stage: .*less than or equal to 2"),
    ("train.lr", r"expected KEY\.PATH=VALUE"),
    ("train.lr.max=1", r"train\.lr in .* is a value, not a section"),
    ("eval.every_n_steps=15", r"eval.every_n_steps \(15\) must be a multiple of train.log_every \(10\)"),
])
def test_invalid_overrides_fail_before_any_work(override, message):
    with pytest.raises(ConfigError, match=message):
        load_params(REPO / "params.yaml", [override])


def test_a_number_given_for_a_text_setting_stays_text():
    assert load_params(REPO / "params.yaml", ["tracking.experiment=2024"]).tracking.experiment == "2024"


def test_mixture_entries_need_distinct_names():
    """Each entry's manifest has its own folder (train/mix/<name>): two with one name would share it."""
    with pytest.raises(ConfigError, match=r"data.mix: .*share the name\(s\) \['mix0'\]"):
        load_params(REPO / "params.yaml", ["data.mix=[{path: a}, {path: b, name: mix0}]"])

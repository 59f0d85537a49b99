"""The ablation study's library side: what a cell changes, what identifies it, and how cells read as a report.
(The study itself, with real training runs, MLflow and Prefect: tests/test_flows.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from evaclip.ablation import (
    ARMS_BY_NAME,
    Cell,
    arm_params,
    best_lr,
    cell_key,
    mean_curve,
    pretrain_params,
    samples_to_reach,
    summarize,
    table,
)
from evaclip.config import load_params

from .conftest import REPO


@pytest.fixture(scope="module")
def base():
    return load_params(REPO / "params.yaml", ["train.steps=100"])


def test_an_arm_changes_what_it_names_and_keeps_the_rest(base, tmp_path):
    params = arm_params(base, ARMS_BY_NAME["mask-0.75-tuned"], 2, 1e-3, Path("eva.safetensors"), tmp_path,
                        curve_every=30, curve_samples=500)
    assert params.model.token_masking == 0.75 and params.train.unmasked_tuning_steps == 10  # a tenth of the steps
    assert (params.train.lr, params.train.visual_lr, params.train.text_lr) == (1e-3, 1e-3, 1e-3)
    assert params.train.seed == params.init.seed == 2 and params.init.vision == Path("eva.safetensors")
    assert params.eval.every_n_steps == 0  # no learning curve for this row
    assert params.train.batch_size == base.train.batch_size and params.train.output_dir == tmp_path / "train"
    curve = arm_params(base, ARMS_BY_NAME["random-lamb"], 0, 2e-3, Path("eva.safetensors"), tmp_path, 30, 500)
    assert curve.init.vision is None and (curve.eval.every_n_steps, curve.eval.every_n_steps_samples) == (30, 500)
    timing = arm_params(base, ARMS_BY_NAME["attn-math-fp32"], 0, 2e-3, None, tmp_path, steps=20)
    assert (timing.model.attention, timing.train.precision, timing.train.steps) == ("math", "fp32", 20)
    assert timing.train.log_every == 5 and timing.init.vision is None  # time only: several intervals, any weights


def test_a_cell_key_follows_what_decides_the_result_and_not_where_it_is_written(base, tmp_path):
    arm = ARMS_BY_NAME["eva-lamb"]
    key = cell_key(arm_params(base, arm, 0, 2e-3, Path("a"), tmp_path / "x"), "run", {"eva": "e1"})
    assert key == cell_key(arm_params(base, arm, 0, 2e-3, Path("b"), tmp_path / "y"), "run", {"eva": "e1"})
    assert key != cell_key(arm_params(base, arm, 1, 2e-3, Path("a"), tmp_path / "x"), "run", {"eva": "e1"})
    assert key != cell_key(arm_params(base, arm, 0, 1e-3, Path("a"), tmp_path / "x"), "run", {"eva": "e1"})
    assert key != cell_key(arm_params(base, arm, 0, 2e-3, Path("a"), tmp_path / "x"), "run", {"eva": "e2"})
    # The pre-training section decides a run's result only through its EVA (whose key is an input).
    longer = base.model_copy(update={"pretrain": base.pretrain.model_copy(update={"steps": 999})})
    assert key == cell_key(arm_params(longer, arm, 0, 2e-3, Path("a"), tmp_path), "run", {"eva": "e1"})
    # ... and a pre-training's result does not depend on the students' steps, only on the hardware it shares.
    fewer = base.model_copy(update={"train": base.train.model_copy(update={"steps": 50})})
    assert cell_key(pretrain_params(base, Path("t"), 100, tmp_path), "pretrain", {"teacher": "t1"}) == cell_key(
        pretrain_params(fewer, Path("u"), 100, tmp_path / "u"), "pretrain", {"teacher": "t1"})
    assert cell_key(pretrain_params(base, Path("t"), 100, tmp_path), "pretrain", {"teacher": "t1"}) != cell_key(
        pretrain_params(base, Path("t"), 400, tmp_path), "pretrain", {"teacher": "t1"})


def _cell(arm, seed, top1, curve=(), lr=2e-3, seconds=100.0):
    return Cell("run", arm, seed, lr, f"{arm}{seed}{lr}", top1=top1, top5=min(1.0, top1 + 0.2), samples_seen=1000,
                train_seconds=seconds, samples_per_s=10.0, curve=list(curve))


def test_the_sweep_picks_the_best_learning_rate():
    cells = [_cell("eva-adamw", 0, 0.5, lr=3e-4), _cell("eva-adamw", 0, 0.62, lr=1e-3), _cell("eva-adamw", 0, 0.4, lr=3e-3)]
    assert best_lr(cells) == 1e-3
    assert best_lr([]) is None


def test_samples_to_reach_interpolates_the_mean_curve_over_seeds():
    seeds = [_cell("eva-lamb", 0, 0.7, [(100, 0.40), (200, 0.60), (300, 0.70)]),
             _cell("eva-lamb", 1, 0.7, [(100, 0.50), (200, 0.70), (300, 0.72)])]
    curve = mean_curve(seeds)
    assert [(s, round(m, 3)) for s, m, _ in curve] == [(100, 0.45), (200, 0.65), (300, 0.71)]
    assert samples_to_reach(curve, 0.55) == pytest.approx(150.0)
    assert samples_to_reach(curve, 0.45) == 100.0
    assert samples_to_reach(curve, 0.9) is None


def test_the_report_gives_mean_and_spread_per_row_and_names_the_missing_cells():
    arms = [ARMS_BY_NAME["random-lamb"], ARMS_BY_NAME["eva-lamb"], ARMS_BY_NAME["mask-0"]]
    rows = {"random-lamb": [_cell("random-lamb", 0, 0.60, [(100, 0.3), (200, 0.5)]),
                            _cell("random-lamb", 1, 0.62, [(100, 0.3), (200, 0.5)])],
            "eva-lamb": [_cell("eva-lamb", 0, 0.70, [(100, 0.4), (200, 0.6)]),
                         _cell("eva-lamb", 1, 0.74, [(100, 0.6), (200, 0.7)])]}
    summary = summarize({"steps": 100}, arms, [0, 1], rows, {"lamb": 2e-3}, {})
    assert summary["missing"] == ["mask-0 seed 0", "mask-0 seed 1"]
    eva = next(r for r in summary["rows"] if r["arm"] == "eva-lamb")
    assert eva["zeroshot_top1"]["mean"] == pytest.approx(0.72) and eva["zeroshot_top1"]["std"] == pytest.approx(0.0283, abs=1e-4)
    assert [s["seed"] for s in eva["seeds"]] == [0, 1] and eva["config"]["lr"] == 2e-3
    # EVA's mean curve (0.5 at 100, 0.65 at 200) reaches random init's final 0.5 at 100 samples, random init at 200.
    eva_samples = summary["eva_samples"]
    assert eva_samples["samples_to_target"] == {"random-lamb": 200.0, "eva-lamb": 100.0} and eva_samples["ratio"] == 0.5
    assert eva_samples["top1_at_budget"] == pytest.approx({"random-lamb": 0.5, "eva-lamb": 0.65})
    assert eva_samples["budget_samples"] == 200
    given = summarize({"steps": 100}, arms, [0, 1], rows, {"lamb": 2e-3}, {}, target_top1=0.6)["eva_samples"]
    assert given["samples_to_target"]["eva-lamb"] == pytest.approx(100 + 100 * 0.1 / 0.15)
    assert given["samples_to_target"]["random-lamb"] is None and given["ratio"] is None  # not within the budget
    text = table(summary)
    assert "| EVA init, LAMB (masking 0.5) | 0.002 | 2/2 | 72.0 ± 2.8 |" in text
    assert "| EVA init, LAMB, no masking | 0.002 | 0/2 | - |" in text
    assert "**Missing cells** (2): mask-0 seed 0, mask-0 seed 1." in text

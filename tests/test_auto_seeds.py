"""compare's power/equivalence parameters and main's `seeds: auto`, as stages (issue 22).

compare runs on hand-made train runs (test_workflow.fake_train_run: no training); main with
`seeds: auto` trains for real on the tiny IDX data, 2 epochs, a few seeds.
"""

from __future__ import annotations

import mlflow
import pytest
import yaml
from conftest import assert_failed, runs_in

from pipeline.cache import compare_keys
from pipeline.core.config import load_study
from pipeline.errors import PipelineError
from pipeline.parameters import stage_params
from test_power_equivalence import CLOSE_A, CLOSE_B
from test_workflow import (  # noqa: F401 (noisy_mnist: a fixture)
    by_stage, children_of, fake_train_run, noisy_mnist, read_csv, read_text, run_compare, run_main,
    stages_table, unique_model_name, write_study,
)


def fake_study(experiment, finals: dict[str, list[float]]) -> str:
    return ",".join(fake_train_run(experiment.id, config, [0.9, 0.93, final], seed=seed)
                    for config, values in finals.items() for seed, final in enumerate(values))


def test_compare_writes_power_and_equivalence_to_pairwise_csv_and_the_conclusion(experiment):
    ids = fake_study(experiment, {"mlp3": CLOSE_A, "mlp4": CLOSE_B})
    run_id = run_compare(run_ids=ids, register=False, equivalence_margin_pp=0.3,
                         detectable_difference_pp=0.05)
    [pair] = read_csv(run_id, "pairwise.csv").to_dict("records")
    assert pair["decision"] == "equivalent" and pair["equivalent"]
    assert pair["equivalence_margin"] == pytest.approx(0.003)
    assert pair["target_difference"] == pytest.approx(0.0005)
    assert 0 < pair["detectable_difference"] < 0.01 and pair["runs_to_detect"] > 5
    text = read_text(run_id, "conclusion.md")
    assert "mlp4 and mlp3 are equivalent within ±0.30 pp" in text
    assert "With 5 runs per config only a gap of" in text
    assert mlflow.get_run(run_id).data.tags["mlflow.note.content"] == text.rstrip("\n")


@pytest.mark.parametrize("params, fragment", [
    ({"equivalence_margin_pp": -0.1}, "equivalence_margin_pp must be a number of percentage "
                                      "points of at least 0"),
    ({"detectable_difference_pp": 0.0}, "detectable_difference_pp must be"),
    ({"first_stage_seeds": "0,1,7"}, "has no run for first-stage seed(s) 7"),
    ({"first_stage_seeds": "0,one"}, "first_stage_seeds must be comma-separated whole numbers"),
])
def test_compare_refuses_bad_analysis_parameters(experiment, params, fragment):
    ids = fake_study(experiment, {"mlp3": CLOSE_A, "mlp4": CLOSE_B})
    with pytest.raises(PipelineError, match="must be|has no run"):
        run_compare(run_ids=ids, register=False, **params)
    [failed] = [r for r in runs_in(experiment, "compare")]
    assert_failed(failed, fragment)


def test_compare_with_first_stage_seeds_uses_steins_test_and_says_if_the_target_was_met(
        experiment):
    ids = fake_study(experiment, {"mlp3": CLOSE_A + [0.9502, 0.9498],
                                  "mlp4": CLOSE_B + [0.9512, 0.9508]})
    run_id = run_compare(run_ids=ids, register=False, first_stage_seeds="0,1,2,3,4",
                         target_half_width_pp=0.05)
    [pair] = read_csv(run_id, "pairwise.csv").to_dict("records")
    assert pair["procedure"] == "stein two-stage"
    text = read_text(run_id, "conclusion.md")
    assert "Stein's two-stage test p = " in text
    assert ("Note: the number of runs was chosen by Stein's two-stage procedure (Chapman's "
            "two-sample form; docs/statistics.md): a first stage of 5 runs per config") in text
    assert "within ±0.05 pp; not reached: the seed cap (max_seeds) stopped the study" in text


def test_the_compare_cache_key_depends_on_the_analysis_parameters():
    base = stage_params("compare")
    keys = {compare_keys.compare_key({**base, **change}, ["r1", "r2"]) for change in (
        {}, {"equivalence_margin_pp": 0.2}, {"detectable_difference_pp": 0.1},
        {"first_stage_seeds": "0,1"}, {"target_half_width_pp": 0.2})}
    assert len(keys) == 5


def write_auto_study(path, model_name, **auto) -> str:
    write_study(path, configs=["mlp3", "mlp4"], registered_model_name=model_name)
    content = yaml.safe_load(path.read_text())
    content.update(seeds="auto", auto_seeds=auto, equivalence_margin_pp=0.5)
    path.write_text(yaml.safe_dump(content))
    return str(path)


class TestStudyFile:
    def test_seeds_auto_reads_its_first_stage_target_and_cap(self, tmp_path):
        path = write_auto_study(tmp_path / "auto.yaml", "m", first_stage=3, half_width_pp=0.25,
                                max_seeds=12)
        study = load_study(path)
        assert study.seeds == [0, 1, 2]
        assert (study.auto.first_stage, study.auto.half_width_pp, study.auto.max_seeds) == \
            (3, 0.25, 12)
        assert study.equivalence_margin_pp == 0.5
        overridden = load_study(path, half_width_pp="0.1", max_seeds="20")
        assert (overridden.auto.half_width_pp, overridden.auto.max_seeds) == (0.1, 20)

    @pytest.mark.parametrize("auto, fragment", [
        ({"first_stage": 3}, "has `seeds: auto` but no target"),
        ({"first_stage": 1, "half_width_pp": 0.2}, "auto_seeds.first_stage must be a whole number"),
        ({"half_width_pp": -1}, "auto_seeds.half_width_pp must be a number"),
        ({"first_stage": 5, "half_width_pp": 0.2, "max_seeds": 4},
         "auto_seeds.max_seeds (4) is below first_stage (5)"),
    ])
    def test_bad_auto_settings_say_what_to_write(self, tmp_path, auto, fragment):
        path = write_auto_study(tmp_path / "auto.yaml", "m", **auto)
        with pytest.raises(PipelineError) as raised:
            load_study(path)
        assert fragment in str(raised.value)

    def test_seeds_auto_on_the_command_line_of_a_fixed_study(self):
        study = load_study("depth_seeds", seeds="auto", half_width_pp="0.2")
        assert study.seeds == [0, 1, 2, 3, 4] and study.auto.half_width_pp == 0.2


@pytest.mark.integration
def test_main_with_seeds_auto_runs_a_second_stage_only_as_needed_and_resumes(
        experiment, noisy_mnist, tmp_path):
    """A wide target: the 2 first-stage seeds suffice. A tiny one: every config goes up to the
    cap (3), reusing the first stage. The same again: the plan is recomputed from the same
    runs, so nothing is trained. workers=1: the trainings in this process, as the executor
    is not the point here (the pool is test_local_pool's)."""
    name = unique_model_name("auto")
    path = write_auto_study(tmp_path / "auto.yaml", name, first_stage=2, half_width_pp=100,
                            max_seeds=3)
    wide = run_main(path, noisy_mnist, workers="1")
    trains = by_stage(children_of(experiment, wide))["train"]
    assert sorted((r.data.params["model_config"], r.data.params["seed"]) for r in trains) == [
        ("mlp3", "0"), ("mlp3", "1"), ("mlp4", "0"), ("mlp4", "1")]
    parent = mlflow.get_run(wide)
    assert parent.data.tags["pipeline.auto_seeds.runs_per_config"] == "mlp3:2,mlp4:2"
    assert parent.data.tags["pipeline.auto_seeds.target_reached"] == "true"
    [comparison] = by_stage(children_of(experiment, wide))["compare"]
    assert comparison.data.params["first_stage_seeds"] == "0,1"
    assert comparison.data.params["equivalence_margin_pp"] == "0.5"

    narrow = run_main(path, noisy_mnist, half_width_pp="0.001", workers="1")
    table = stages_table(narrow)
    trained = table[(table.stage == "train") & ~table.reused]
    assert sorted(trained.label) == ["train-mlp3-seed2", "train-mlp4-seed2"]
    assert table[(table.stage == "train") & table.reused].shape[0] == 4
    assert mlflow.get_run(narrow).data.tags["pipeline.auto_seeds.target_reached"] == "false"
    [comparison] = by_stage(children_of(experiment, narrow))["compare"]
    text = comparison.data.tags["mlflow.note.content"]
    assert "not reached: the seed cap (max_seeds) stopped the study" in text
    assert "3 runs of mlp3" in text or "3 runs per config" in text

    again = stages_table(run_main(path, noisy_mnist, half_width_pp="0.001", workers="1"))
    assert again.reused.all() and list(again.label) == list(table.label)

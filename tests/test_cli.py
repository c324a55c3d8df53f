"""`python -m pipeline <stage> --key value` and its agreement with MLproject."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import mlflow
import pytest
import yaml
from conftest import REPO_ROOT, create_experiment, runs_in

from pipeline.cli import build_parser, main
from pipeline.core.config import read_yaml
from pipeline.errors import PipelineError
from pipeline.parameters import parse_bool, stage_params

MLPROJECT = read_yaml(REPO_ROOT / "MLproject")
STAGES = list(MLPROJECT["entry_points"])


def stage_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_cli_parameters_are_mlprojects_for_every_stage():
    parsers = stage_parsers()
    assert set(parsers) == set(STAGES)
    for stage, parser in parsers.items():
        options = {
            a.dest for a in parser._actions
            if a.option_strings and a.dest not in ("help", "experiment")
        }
        declared = MLPROJECT["entry_points"][stage].get("parameters", {})
        assert options == set(declared), stage
        for name, spec in declared.items():
            assert parser.get_default(name) == spec.get("default"), (stage, name)


def test_mlproject_commands_pass_every_parameter_under_its_own_name():
    for stage, point in MLPROJECT["entry_points"].items():
        command = " ".join(point["command"].split())
        assert command.startswith(f"python -m pipeline {stage} "), stage
        pairs = re.findall(r"--(\w+) \{(\w+)\}", command)
        assert all(flag == placeholder for flag, placeholder in pairs), (stage, pairs)
        assert {flag for flag, _ in pairs} == set(point.get("parameters", {})), stage


def test_train_defaults_are_the_seeds():
    params = stage_params("train")
    assert (params["epochs"], params["batch_size"], params["lr"], params["momentum"]) == (
        20, 64, 0.01, 0.9
    )
    assert params["normalize"] is False
    assert params["config"] == "experiments/mlp3.yaml"
    assert (params["samples_per_class"], params["sampling"]) == ("600", "first")
    sample = stage_params("sample_data")
    assert (sample["samples_per_class"], sample["sampling"]) == ("600", "first")


def test_stage_params_convert_types():
    params = stage_params(
        "train", {"epochs": "3", "lr": "1e-2", "normalize": "True", "log_model": "0"}
    )
    assert params["epochs"] == 3 and params["lr"] == 0.01
    assert params["normalize"] is True and params["log_model"] is False


@pytest.mark.parametrize(
    "stage, overrides, match",
    [
        ("train", {"epochs": "three"}, "epochs must be of type int, got 'three'"),
        ("train", {"lr": "fast"}, "lr must be of type float"),
        ("sample_data", {"download": "maybe"}, "download must be of type bool"),
        ("train", {"epoch": 3}, "train has no parameter epoch"),
        ("deploy", {}, "unknown stage 'deploy'"),
    ],
)
def test_stage_params_reject_bad_values(stage, overrides, match):
    with pytest.raises(PipelineError, match=match):
        stage_params(stage, overrides)


def test_parse_bool():
    assert parse_bool("true") is True and parse_bool("False") is False
    with pytest.raises(PipelineError):
        parse_bool("ja")


def test_cli_bad_type_exits_2_with_a_one_line_error(capsys, cli_environment):
    assert main(["train", "--epochs", "three"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err]
    assert err.startswith("error: train: parameter epochs must be of type int")


@pytest.mark.parametrize("stage", STAGES)
def test_help_says_what_every_parameter_means_with_its_type_and_default(stage, capsys):
    point = MLPROJECT["entry_points"][stage]
    with pytest.raises(SystemExit):
        build_parser().parse_args([stage, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert " ".join(point["description"].split()) in text
    for name, spec in point["parameters"].items():
        meaning = " ".join(str(spec.get("help", "")).split())
        assert len(meaning) > 10, f"MLproject: {stage}.{name} needs a `help:` that says what it means"
        default = f"'{spec['default']}'" if spec["type"] == "string" else spec["default"]
        assert f"--{name} {spec['type'].upper()} {meaning} ({spec['type']}, default {default})" in text


def test_help_lists_the_stages():
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "--help"], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=60,
    )
    assert result.returncode == 0
    for stage in STAGES:
        assert re.search(rf"^\s+{stage}\b", result.stdout, re.MULTILINE), stage


def test_train_with_zero_epochs_exits_2_with_a_one_line_error_and_a_failed_run(
        tracking_store, capsys, cli_environment):
    """`python -m pipeline train --epochs 0`, its main run in this process (its __main__ ends
    the process with os._exit: pipeline.process_exit). The command in a process of its own,
    through `mlflow run` (no traceback, the line on its stderr): test_integration.py's
    zero-epochs test."""
    experiment = create_experiment(tracking_store, "cli-epochs-0")
    code = main(["train", "--epochs", "0", "--experiment", experiment.name, "--device", "cpu"])
    assert code == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: epochs must be a positive integer, got 0"]
    assert err.strip().splitlines()[-1] == errors[0]
    [run] = runs_in(experiment)
    assert run.info.status == "FAILED"
    assert run.data.tags["pipeline.error"] == "epochs must be a positive integer, got 0"
    assert mlflow.get_experiment(experiment.id).name == experiment.name


def test_unknown_option_is_an_argparse_error():
    parser = build_parser()
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["train", "--epochz", "3"])
    assert info.value.code == 2



def test_a_malformed_config_exits_2_with_one_line_and_a_failed_run(tracking_store, tmp_path, capsys,
                                                                   cli_environment):
    experiment = create_experiment(tracking_store, "cli-bad-units")
    config = tmp_path / "bad.yaml"
    config.write_text("name: bad\nmodel: {type: mlp, hidden: [{units: -5}]}\n")
    code = main(["train", "--config", str(config), "--experiment", experiment.name,
                 "--device", "cpu", "--data_run_id", "unused"])
    assert code == 2
    message = f"{config}: model.hidden[0].units must be a positive whole number, got -5"
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [f"error: {message}"]
    [run] = runs_in(experiment)
    assert run.info.status == "FAILED"
    assert run.data.tags["pipeline.error"] == message


def test_every_yaml_file_of_the_project_reads_as_with_pyyamls_own_safe_loader():
    """read_yaml takes libyaml's faster parser: what it reads must not differ."""
    for path in [REPO_ROOT / "MLproject", *sorted((REPO_ROOT / "experiments").glob("*.yaml"))]:
        assert read_yaml(path) == yaml.load(path.read_text(), Loader=yaml.SafeLoader), path

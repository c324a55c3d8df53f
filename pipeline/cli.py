"""`python -m pipeline <stage> --key value`, with the stages and parameters of MLproject."""

from __future__ import annotations

import argparse
import os
import sys

from pipeline import interrupts
from pipeline.errors import PipelineError
from pipeline.parameters import entry_points, stage_params


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline", description="Stages of the MNIST MLP study (see MLproject).",
        allow_abbrev=False,  # `--epoch 3` must not quietly mean `--epochs 3`
    )
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage, point in entry_points().items():
        described = point.get("description", f"Run the {stage} stage.")
        # argparse expands %-formats in help texts (not in descriptions).
        sub = stages.add_parser(stage, help=described.replace("%", "%%"), description=described,
                                allow_abbrev=False)
        sub.add_argument(
            "--experiment", default=None, metavar="NAME",
            help="MLflow experiment to log into (default: $MLFLOW_EXPERIMENT_NAME or mnist-mlp)",
        )
        for name, spec in point.get("parameters", {}).items():
            kind = spec.get("type", "string")
            shown = f"'{spec.get('default')}'" if kind == "string" else spec.get("default")
            sub.add_argument(
                f"--{name}", default=spec.get("default"), metavar=kind.upper(),
                help=f"{spec.get('help', '')} ({kind}, default {shown})".replace("%", "%%"),
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    stage, experiment = args.pop("stage"), args.pop("experiment")
    if stage == "main":
        # First: the pool's fork server then loads torch and MLflow beside this process's
        # own imports (seconds on one core), not after them.
        from pipeline.scale.pool_processes import start_for_study

        start_for_study(args, experiment)
    from pipeline.runs import tracking, tracking_access
    from pipeline.stage_index import STAGES

    tracking_access.apply_http_defaults()
    quiet_progress_bars_off_a_terminal()
    try:
        params = stage_params(stage, args)
        tracking.use_experiment(experiment)
        with interrupts.installed():
            run_id = STAGES[stage](params)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except interrupts.Interrupted as stop:
        print(interrupted_message(stage, stop), file=sys.stderr, flush=True)
        return stop.exit_code
    except Exception as err:  # a login refused or a server away before any run could start
        explained = tracking_access.explain(err, experiment)
        if explained is None:
            raise
        print(f"error: {explained}", file=sys.stderr)
        return 2
    print(f"{stage} finished: run {run_id}")
    return 0


def quiet_progress_bars_off_a_terminal() -> None:
    """MLflow draws a bar for every artifact it fetches; in a log file that is most of the
    output. Bars stay on a terminal; the user's own setting wins either way."""
    if not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def interrupted_message(stage: str, stop: interrupts.Interrupted) -> str:
    """One line: what was stopped, and the command that picks the work up again."""
    ended = f"{stop.stage} run {stop.run_id} ended KILLED" if stop.run_id else "no run started"
    if stop.run_id in stop.unmarked:
        ended = (f"{stop.stage} run {stop.run_id} stopped, but the tracking server did not "
                 f"answer, so it still shows RUNNING")
    if stage == "main":
        how = ("run the same command again: finished stages are reused and an interrupted "
               "training resumes from its last checkpoint")
    elif stop.stage == "train" and stop.run_id:
        how = (f"resume it with the same parameters plus --resume_run_id {stop.run_id} "
               f"(mlflow run: -P resume_run_id={stop.run_id})")
    else:
        how = "run the same command again"
    return f"interrupted by {stop}: {ended}; {how}"

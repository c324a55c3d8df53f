"""One stage run in a worker process (a Ray task's or the local pool's), nested under the
study's main run: the outcome as data, never an exception, so that the driver can wait for
every job and then name each failed run."""

from __future__ import annotations

from pipeline import interrupts
from pipeline.runs import tracking
from pipeline.stage_index import STAGES


def run_nested(stage: str, params: dict, parent_run_id: str, tags: dict[str, str]) -> dict:
    """Run `stage` with `params` under `parent_run_id`, its run tagged with `tags` (which hold
    the job's tracking.TASK_TAG, by which a failed run is found). SIGTERM and SIGINT end the
    run KILLED. Returns run_id, error (one line, or None) and interrupted."""
    outcome = {"run_id": None, "error": None, "interrupted": False}
    try:
        with interrupts.installed(), tracking.nested_under(parent_run_id, tags):
            outcome["run_id"] = STAGES[stage](params)
    except interrupts.Interrupted as stop:
        outcome.update(run_id=stop.run_id, interrupted=True, error=f"interrupted by {stop}")
    except Exception as err:  # noqa: BLE001 - reported by the driver, with the run it failed
        runs = tracking.find_runs_tagged(tracking.TASK_TAG, tags[tracking.TASK_TAG])
        outcome.update(run_id=runs[0].info.run_id if runs else None,
                       error=tracking.error_message(err).splitlines()[0])
    return outcome

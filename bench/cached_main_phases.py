"""Where the seconds of one fully cached `python -m pipeline main` go, timed in this process:
importing MLflow, opening the tracking store (SQLAlchemy, the schema check), the SQL statements
the run makes (counted and timed on SQLAlchemy's engine events), and the rest (our code, and
MLflow's own Python around each call). Run by bench/cached_rerun.py after a cold run filled the
store; prints one line of JSON.

    python bench/cached_main_phases.py main --data_dir ... --experiment ...
"""

import json
import sys
import time

started = time.perf_counter()
import mlflow  # noqa: E402

imported_mlflow = time.perf_counter()
# MLflow opens the store on its first call; this is the call that does it.
from mlflow.tracking._tracking_service.utils import _get_store  # noqa: E402

_get_store()
opened_store = time.perf_counter()

from sqlalchemy import event  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

statements = {"count": 0, "seconds": 0.0}


@event.listens_for(Engine, "before_cursor_execute")
def _before(conn, cursor, statement, parameters, context, executemany):
    conn.info["pipeline_bench_t0"] = time.perf_counter()


@event.listens_for(Engine, "after_cursor_execute")
def _after(conn, cursor, statement, parameters, context, executemany):
    statements["count"] += 1
    statements["seconds"] += time.perf_counter() - conn.info.pop("pipeline_bench_t0")


from pipeline.cli import main  # noqa: E402

code = main(sys.argv[1:])
finished = time.perf_counter()
print(json.dumps({
    "import_mlflow_s": imported_mlflow - started,
    "open_store_s": opened_store - imported_mlflow,
    "main_s": finished - opened_store,
    "sql_statements": statements["count"],
    "sql_s": statements["seconds"],
    "exit_code": code,
}))

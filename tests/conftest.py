"""Shared fixtures: a throwaway MLflow tracking store, per-test experiments, tiny real MNIST files.

Nothing here touches the user's ./mlflow.db or ./mlruns: the tracking store is one SQLite file
per test session under pytest's tmp dir, and every experiment the tests create puts its
artifacts there too.
"""

from __future__ import annotations

import os

# Before mlflow is imported anywhere: no telemetry from test runs.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
# The tests' tensors are tiny: one thread is faster, and two OpenMP threads spin-waiting on a
# 2-core machine that is busy with anything else slow a 0.02 s epoch down to over a second.
# The train stage runs with the threads this names (pipeline.cache.machine), here and in the stage
# processes the tests start.
os.environ["OMP_NUM_THREADS"] = "1"

import re  # noqa: E402
import sqlite3  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import uuid  # noqa: E402
from contextlib import closing  # noqa: E402
from unittest import mock  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
# The real MNIST root (torchvision layout MNIST/raw/*), ../shared/datasets from the repo root.
REAL_DATA_ROOT = Path(__file__).parents[1].parent / "shared" / "datasets"
REAL_RAW_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
HAVE_REAL_MNIST = all((REAL_DATA_ROOT / "MNIST" / "raw" / f).is_file() for f in REAL_RAW_FILES)
# What a test needs from the machine. Missing, it is skipped on a developer's machine and fails
# under CI (.ci/run runs with CI=true): a CI run that skipped them would prove nothing.
requires_real_mnist = pytest.mark.real_mnist
requires_postgres = pytest.mark.postgres
MISSING_REAL_MNIST = (
    f"real MNIST not found under {REAL_DATA_ROOT / 'MNIST' / 'raw'}: put the four raw files "
    f"({', '.join(REAL_RAW_FILES)}) there, torchvision's layout"
)
MISSING_POSTGRES = ("PostgreSQL's server programs are not installed: apt-get install postgresql "
                    "(.ci/run does it)")

# Variables `mlflow run` sets for the process it starts; left over in a shell they would make
# the stages resume someone else's run or write to another experiment.
RUN_ENV_VARS = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")

# Tiny MNIST written by the tests: 30 train and 12 test images of each digit.
TINY_TRAIN_PER_CLASS = 30
TINY_TEST_PER_CLASS = 12


def pytest_configure(config):
    # MLflow's SQLAlchemy store trips this deprecation on every fresh store; not ours to fix.
    config.addinivalue_line(
        "filterwarnings", "ignore:The ``noload`` loader strategy is deprecated:DeprecationWarning"
    )


def missing_requirement(item) -> str | None:
    """Why this machine cannot run the test `item` (its real_mnist / postgres marks), or None."""
    if item.get_closest_marker("real_mnist") and not HAVE_REAL_MNIST:
        return MISSING_REAL_MNIST
    if item.get_closest_marker("postgres"):
        from pipeline.server.postgres import find_bin_dir

        if find_bin_dir() is None:
            return MISSING_POSTGRES
    return None


def skip_or_fail(reason: str, ci: bool) -> None:
    if ci:
        pytest.fail(f"CI needs this test to run: {reason}", pytrace=False)
    pytest.skip(reason)


# `make test` spreads the suite over worker processes (pytest-xdist, --dist loadgroup): a module
# stays on one worker, so its module-scoped fixtures (servers, Ray, studies) are built once.
# The modules that start Ray share one group, so no two Ray clusters run at once: each starts a
# dozen processes, and run side by side on two cores they tripled each other's time (3 workers,
# 2026-12-02: 1,283 s of summed test time against 662 s). That group and then the slowest
# modules are handed out first (`make test` passes --no-loadscope-reorder; xdist's own order is
# by number of tests), so the run does not end with one worker busy on a long module while the
# others sit idle. Slowest first, from `--durations=0` of a quiet run (docs/benchmarks.md, "The
# test suite"); a module missing here only starts later.
RAY_MODULES = ("test_ray_executor", "test_ray_cluster_nodes", "test_tune")
RAY_GROUP = "ray"
SLOWEST_GROUPS_FIRST = (
    RAY_GROUP, "test_workflow", "test_tracking_outage", "test_local_pool", "test_resume",
    "test_team_server", "test_workflow_integration", "test_server_start", "test_integration",
    "test_auto_seeds", "test_stages", "test_interrupts",
)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            module = item.module.__name__.rpartition(".")[2]
            group = RAY_GROUP if module in RAY_MODULES else module
            item.add_marker(pytest.mark.xdist_group(group))
    rank = {group: position for position, group in enumerate(SLOWEST_GROUPS_FIRST)}
    items.sort(key=lambda item: rank.get(_group(item), len(rank)))


def _group(item) -> str:
    marker = item.get_closest_marker("xdist_group")
    return marker.args[0] if marker.args else marker.kwargs.get("name", "")


def pytest_runtest_setup(item):
    reason = missing_requirement(item)
    if reason:
        skip_or_fail(reason, ci=os.environ.get("CI", "").lower() == "true")


# --------------------------------------------------------------------------------------------
# Tracking store and experiments
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrackingStore:
    uri: str
    root: Path  # holds mlflow.db and artifacts/

    @property
    def artifact_root(self) -> Path:
        return self.root / "artifacts"


@dataclass(frozen=True)
class Experiment:
    id: str
    name: str


# Taken before the session moves this process's temporary files into pytest's folder, whose
# folders only root can open.
SYSTEM_TEMP = tempfile.gettempdir()


def reachable_folder(prefix: str) -> Path:
    """A new folder, outside pytest's private ones, that the `postgres` user running a test's
    cluster can reach; the test removes it."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=SYSTEM_TEMP))
    root.chmod(0o711)
    return root


@pytest.fixture(scope="session", autouse=True)
def tracking_store(tmp_path_factory) -> TrackingStore:
    """One temporary SQLite store for the whole session (creating one costs ~1.5 s).

    Autouse, so that no test can fall back on ./mlflow.db; MLflow creates its tables when a
    test first talks to the store.
    """
    root = tmp_path_factory.mktemp("mlflow")
    store = TrackingStore(uri=f"sqlite:///{root / 'mlflow.db'}", root=root)
    store.artifact_root.mkdir()
    use_write_ahead_log(root / "mlflow.db")
    with pytest.MonkeyPatch.context() as mp:
        for var in RUN_ENV_VARS:
            mp.delenv(var, raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", store.uri)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        # The raw-file digest memo, kept out of the user's ~/.cache.
        mp.setenv("PIPELINE_CACHE_DIR", str(root / "cache"))
        # This process's temporary files (the tests' own downloads of artifacts and models,
        # which MLflow never removes) go to the session's folder, which pytest removes with its
        # old ones: left in /tmp they came to gigabytes over a day of runs. The pipeline's own
        # downloads are checked not to be left anywhere (test_workflow, test_resume).
        mp.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("tmp")))
        mlflow.set_tracking_uri(store.uri)
        yield store
        _end_active_runs()


def use_write_ahead_log(database: Path) -> None:
    """Create the SQLite file in write-ahead-log mode, which the file keeps.

    A session's store is written by this test process, its pool workers and Ray workers at
    once; in SQLite's default mode a reader waits behind every writer, and under three xdist
    workers on two cores a read gave up after MLflow's 20 s busy timeout ("database is
    locked"). In WAL mode readers never wait and writers wait only for each other.
    """
    with closing(sqlite3.connect(database)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


@pytest.fixture(autouse=True)
def _clean_mlflow_run_env(monkeypatch):
    """No test sees MLFLOW_RUN_ID / MLFLOW_EXPERIMENT_ID / MLFLOW_EXPERIMENT_NAME."""
    for var in RUN_ENV_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def cli_environment():
    """For a test that runs `python -m pipeline`'s main in this process: what it sets in its
    process's environment (HTTP limits, progress bars off) is undone afterwards, as the end of
    its own process would."""
    with mock.patch.dict(os.environ):
        yield


def _end_active_runs() -> None:
    while mlflow.active_run() is not None:
        mlflow.end_run()


def create_experiment(store: TrackingStore, label: str) -> Experiment:
    """A new, uniquely named experiment whose artifacts live under the temporary store."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", label)[:60].strip("-")
    name = f"test-{safe}-{uuid.uuid4().hex[:8]}"
    experiment_id = mlflow.create_experiment(
        name, artifact_location=(store.artifact_root / name).as_uri()
    )
    return Experiment(id=experiment_id, name=name)


def use_new_experiment(store: TrackingStore, label: str) -> Experiment:
    experiment = create_experiment(store, label)
    mlflow.set_experiment(experiment.name)
    return experiment


@pytest.fixture
def experiment(tracking_store, request) -> Experiment:
    """A fresh experiment, made the active one, for this test alone."""
    _end_active_runs()
    yield use_new_experiment(tracking_store, request.node.name)
    _end_active_runs()


def runs_in(experiment: Experiment, stage: str | None = None) -> list:
    """All runs of an experiment (optionally of one pipeline stage), oldest first."""
    runs = mlflow.search_runs(
        experiment_ids=[experiment.id], output_format="list",
        order_by=["attributes.start_time ASC"],
    )
    if stage is not None:
        runs = [r for r in runs if r.data.tags.get("pipeline.stage") == stage]
    return runs


def only_run(experiment: Experiment, stage: str):
    runs = runs_in(experiment, stage)
    assert len(runs) == 1, f"expected one {stage} run, found {len(runs)}"
    return runs[0]


def subprocess_env(store: TrackingStore) -> dict:
    """Environment for a child process: the temporary store, and this interpreter's `python`
    first on PATH (what `mlflow run --env-manager local` runs the entry point with)."""
    env = {k: v for k, v in os.environ.items() if k not in RUN_ENV_VARS}
    env["MLFLOW_TRACKING_URI"] = store.uri
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------------------------
# Tiny real MNIST (IDX files torchvision reads for real)
# --------------------------------------------------------------------------------------------


def digit_block(digit: int) -> tuple[slice, slice]:
    """Where digit `digit`'s bright block sits: two rows of five positions, all disjoint."""
    row, col = (digit // 5) * 14 + 4, (digit % 5) * 5 + 2
    return slice(row, row + 6), slice(col, col + 4)


@dataclass(frozen=True)
class TinyMnist:
    root: Path
    train_images: np.ndarray  # (N, 28, 28) uint8, file order
    train_labels: np.ndarray  # (N,) uint8, file order
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def raw(self) -> Path:
        return self.root / "MNIST" / "raw"

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return (self.train_images, self.train_labels) if name == "train" else (
            self.test_images, self.test_labels
        )


def write_idx_images(path: Path, images: np.ndarray) -> None:
    assert images.dtype == np.uint8 and images.ndim == 3
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">IIII", 0x00000803, n, rows, cols) + images.tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    assert labels.dtype == np.uint8 and labels.ndim == 1
    path.write_bytes(struct.pack(">II", 0x00000801, len(labels)) + labels.tobytes())


def write_tiny_mnist(
    root: Path,
    train_per_class: int = TINY_TRAIN_PER_CLASS,
    test_per_class: int = TINY_TEST_PER_CLASS,
    seed: int = 0,
) -> TinyMnist:
    """Write root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.

    Classes come in shuffled order; each digit is noise (0..59) plus a bright 6x4 block
    (200..255) at a position of its own, so a model can learn it in an epoch or two.
    """
    rng = np.random.default_rng(seed)
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
        images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
        for i, digit in enumerate(labels):
            rows, cols = digit_block(int(digit))
            images[i, rows, cols] = rng.integers(200, 256, size=(6, 4), dtype=np.uint8)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
        arrays[prefix] = (images, labels)
    return TinyMnist(
        root=Path(root),
        train_images=arrays["train"][0], train_labels=arrays["train"][1],
        test_images=arrays["t10k"][0], test_labels=arrays["t10k"][1],
    )


@pytest.fixture
def tiny_mnist(tmp_path) -> TinyMnist:
    """Tiny MNIST of this test's own under tmp_path (free to truncate or corrupt)."""
    return write_tiny_mnist(tmp_path)


@pytest.fixture(scope="session")
def shared_tiny_mnist(tmp_path_factory) -> TinyMnist:
    """Tiny MNIST shared by the session's stage runs; tests must not modify it."""
    return write_tiny_mnist(tmp_path_factory.mktemp("tiny_mnist"))


# --------------------------------------------------------------------------------------------
# Stage runs shared across tests (each sample_data run costs seconds: its digit grid)
# --------------------------------------------------------------------------------------------

SHARED_SAMPLES_PER_CLASS = 12


@dataclass(frozen=True)
class SampleRun:
    run_id: str
    experiment: Experiment
    params: dict
    data: TinyMnist


@pytest.fixture(scope="session")
def sample_run(tracking_store, shared_tiny_mnist) -> SampleRun:
    """One real sample_data run (first 12 of each digit) on the shared tiny MNIST."""
    from pipeline.parameters import stage_params
    from pipeline.stages import sample_data

    _end_active_runs()
    experiment = use_new_experiment(tracking_store, "shared-sample")
    params = stage_params(
        "sample_data",
        {"data_dir": str(shared_tiny_mnist.root), "samples_per_class": SHARED_SAMPLES_PER_CLASS,
         "download": False},
    )
    run_id = sample_data.run(params)
    return SampleRun(run_id=run_id, experiment=experiment, params=params, data=shared_tiny_mnist)


def train_overrides(sample: SampleRun, **overrides) -> dict:
    """Small, fast train parameters on the shared sample run."""
    values = {
        "config": "mlp3", "epochs": 2, "batch_size": 16, "device": "cpu",
        "log_model": False, "data_run_id": sample.run_id,
    }
    values.update(overrides)
    return values


def download(run_id: str, path: str) -> Path:
    """A run's artifact, fetched to a local path."""
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path))


def assert_failed(run, *fragments: str) -> str:
    """The run is FAILED, carries pipeline.error, and the message holds every fragment."""
    assert run.info.status == "FAILED"
    message = run.data.tags.get("pipeline.error")
    assert message, "a failed run must say why in the pipeline.error tag"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert mlflow.active_run() is None, "the failed run was left active"
    return message


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """A copy of the pipeline package that the key functions read instead of the real one:
    edit it to see which stages' keys an edit changes (the code that runs stays the real one)."""
    import shutil

    from pipeline.cache import code_digest

    root = tmp_path / "pipeline"
    shutil.copytree(REPO_ROOT / "pipeline", root, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(code_digest, "PACKAGE_ROOT", root)
    # Code versions are remembered between processes: here, not in the user's ~/.cache.
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    for cached in (code_digest._pipeline_imports, code_digest._source_path):
        cached.cache_clear()
    yield root
    for cached in (code_digest._pipeline_imports, code_digest._source_path):
        cached.cache_clear()

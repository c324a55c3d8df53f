"""A sample_data run as the stages after it use it: its sample fetched back, recorded as the
MLflow dataset inputs of the run that consumes it, or the run found for a consuming stage."""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from typing import Callable

import mlflow
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.exceptions import MlflowException

from pipeline.cache import sample_keys
from pipeline.core import sampling
from pipeline.core.data import Sample, draw_sample, load_sample
from pipeline.errors import PipelineError
from pipeline.parameters import stage_params
from pipeline.runs import tracking

STAGE = "sample_data"
SAMPLE_ARTIFACT = "sample/sample.npz"
# samples_per_class=all logs no copy of MNIST, only the digests of the raw files it is.
RAW_DIGESTS_ARTIFACT = "sample/raw_files.json"
DATA_ROOT_TAG = "data_root"


def log_sample_inputs(sample: Sample, data_run_id: str) -> None:
    """Record both splits as MLflow dataset inputs; equal samples get equal digests."""
    run = mlflow.get_run(data_run_id)
    whole = _is_whole(run)
    if whole:
        source = dataset_source(run.data.tags.get(DATA_ROOT_TAG, "") + "/MNIST/raw")
        files = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{RAW_DIGESTS_ARTIFACT}")
    else:
        source = dataset_source(run.info.artifact_uri + "/" + SAMPLE_ARTIFACT)
    for split, context in (("train", "training"), ("test", "testing")):
        part = sample.split(split)
        prefix = "train" if split == "train" else "t10k"
        dataset = mlflow.data.from_numpy(
            features=part.images.reshape(len(part.images), -1).numpy(),
            targets=part.labels.numpy(),
            source=source,
            name=f"mnist-{split}-{'full' if whole else 'sample'}",
            # MLflow's own digest hashes only the first rows; for a whole split the raw files'
            # sha256 says exactly which MNIST it is.
            digest=_combined_digest(files, prefix) if whole else None,
        )
        mlflow.log_input(dataset, context=context)


def _is_whole(sample_run) -> bool:
    return sampling.normalized(sample_run.data.params.get("samples_per_class")) == sampling.ALL


def _combined_digest(files: dict, prefix: str) -> str:
    parts = [f"{name}:{files[name]}" for name in sorted(files) if name.startswith(prefix)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def dataset_source(uri: str) -> DatasetSource:
    """The artifact's source where MLflow can resolve its scheme, else a tag naming it."""
    with warnings.catch_warnings():
        # MLflow registers its local-file source twice and warns that the path is ambiguous.
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways")
        try:
            return resolve_dataset_source(uri)
        except MlflowException:
            return CodeDatasetSource(tags={"artifact_uri": uri})


def fetch_sample(run_id: str, data_dir: str = "") -> Sample:
    """The sample a finished sample_data run logged; for samples_per_class=all, the raw MNIST
    files it recorded, read from `data_dir` or where the sample was drawn, once their sha256
    shows they are the same files."""
    run = tracking.get_stage_run(run_id, STAGE, "data_run_id")
    if not _is_whole(run):
        # Into a folder of our own: MLflow's default one is never removed, a copy per stage run.
        with tempfile.TemporaryDirectory(prefix="mnist-sample-") as scratch:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=SAMPLE_ARTIFACT, dst_path=scratch)
            try:
                return load_sample(path)
            except PipelineError as err:
                # err names a copy that is gone when this returns, and numpy's reason for
                # random bytes suggests unpickling them: name the artifact only.
                raise PipelineError(
                    f"{SAMPLE_ARTIFACT} of sample_data run {run_id} is corrupt: it is not a "
                    f"sample written by sample_data; draw a new one (main: force=true)"
                ) from err
    recorded = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{RAW_DIGESTS_ARTIFACT}")
    candidates = dict.fromkeys(d for d in (data_dir, run.data.tags.get(DATA_ROOT_TAG)) if d)
    for root in candidates:
        if sample_keys.raw_digests(root) == recorded:
            return draw_sample(root, None, download=False)
    raise PipelineError(
        f"sample_data run {run_id} is the whole of MNIST, read from the raw files, and none of "
        f"{', '.join(str(sample_keys.raw_folder(r)) for r in candidates)} holds the same files "
        f"(sha256 in its {RAW_DIGESTS_ARTIFACT}); point data_dir at that MNIST"
    )


def resolve_data_run(params: dict, draw: Callable[[dict], str]) -> str:
    """For a consuming stage: the given sample_data run, a finished one with the same
    sampling (`sampling_seed` is sample_data's `seed`), or a new one that `draw` (the
    sample_data stage, passed in so that no stage imports another) draws."""
    if params["data_run_id"]:
        tracking.get_stage_run(params["data_run_id"], STAGE, "data_run_id")
        return params["data_run_id"]
    wanted = stage_params(
        STAGE,
        {
            "data_dir": params["data_dir"],
            "samples_per_class": params["samples_per_class"],
            "sampling": params["sampling"],
            "seed": params["sampling_seed"],
        },
    )
    cached = tracking.find_cached_run(sample_keys.sample_data_key(wanted))
    if cached:
        print(f"using sample_data run {cached.info.run_id} "
              f"({sample_keys.sample_description(wanted)})")
        return cached.info.run_id
    print(f"no finished sample_data run for {sample_keys.sample_description(wanted)}: "
          f"drawing one")
    return draw(wanted)

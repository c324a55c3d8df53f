"""The validation split a sweep scores its trials on, carved from the training sample.

Pure: indices in, indices out, no MLflow and no torch. Stratified (every digit keeps its share)
and seeded, so the same sample, fraction and seed give the same split on every rerun; the test
split is never touched.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from pipeline.errors import PipelineError


def split_indices(labels: np.ndarray, val_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (sorted) of the part trials fit on and of the validation part."""
    labels = np.asarray(labels)
    positions = np.arange(len(labels))
    try:
        fit, val = train_test_split(positions, test_size=val_size, random_state=seed,
                                    stratify=labels)
    except ValueError as err:
        raise PipelineError(
            f"val_size={val_size}: cannot hold out a stratified validation split from "
            f"{len(labels)} training images ({err}); use a larger sample or another val_size"
        ) from err
    return np.sort(fit), np.sort(val)

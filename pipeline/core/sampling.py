"""How a sample is asked for: a number of images per digit, or `all`, and the sampling rule.

Torch-free, so that cache keys and run names can be worked out without loading torch.
"""

from __future__ import annotations

from pipeline.errors import PipelineError

SAMPLING_METHODS = ("first", "random")
# samples_per_class=all: both splits whole, as MNIST ships them (60,000 / 10,000, unbalanced).
ALL = "all"


def normalized(samples_per_class: object) -> str:
    """`600`, "600" and " 600 " are one request, as are "all" and "ALL"."""
    return str(samples_per_class).strip().lower()


def parse_samples_per_class(value: object) -> int | None:
    """A positive whole number of images per digit, or None for `all`."""
    text = normalized(value)
    if text == ALL:
        return None
    if not text.isdigit() or int(text) < 1:
        raise PipelineError(f"samples_per_class must be a positive whole number or {ALL!r}, "
                            f"got {value!r}")
    return int(text)


def describe(samples_per_class: object, sampling: str, seed: int) -> str:
    """A sample's short name: first600, random600-seed3, all."""
    count = normalized(samples_per_class)
    if count == ALL:
        return ALL
    if sampling == "random":
        return f"random{count}-seed{seed}"
    return f"first{count}"

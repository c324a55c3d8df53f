"""What the suite does on a machine that lacks real MNIST or PostgreSQL: a developer's run skips
those tests and says what is missing; a CI run (CI=true, as .ci/run is started) fails them. And
how it is spread over xdist workers."""

from __future__ import annotations

import pytest
from conftest import (MISSING_POSTGRES, MISSING_REAL_MNIST, RAY_GROUP, RAY_MODULES, REPO_ROOT,
                      SLOWEST_GROUPS_FIRST, skip_or_fail)


@pytest.mark.parametrize("reason", [MISSING_REAL_MNIST, MISSING_POSTGRES])
def test_a_missing_requirement_skips_outside_ci_and_says_what_to_install(reason):
    with pytest.raises(pytest.skip.Exception, match="apt-get install postgresql|raw files"):
        skip_or_fail(reason, ci=False)


@pytest.mark.parametrize("reason", [MISSING_REAL_MNIST, MISSING_POSTGRES])
def test_a_missing_requirement_fails_under_ci(reason):
    with pytest.raises(pytest.fail.Exception, match="CI needs this test to run: ") as failed:
        skip_or_fail(reason, ci=True)
    assert reason in str(failed.value)


def test_the_marks_name_what_is_missing(request):
    """The real_mnist and postgres marks are what the check reads (an unmarked test needs
    nothing)."""
    from conftest import missing_requirement

    assert missing_requirement(request.node) is None


def test_the_modules_named_for_the_workers_exist():
    """A renamed module would silently lose its place in the queue, or its Ray group."""
    named = [*RAY_MODULES, *(g for g in SLOWEST_GROUPS_FIRST if g != RAY_GROUP)]
    missing = [name for name in named if not (REPO_ROOT / "tests" / f"{name}.py").is_file()]
    assert not missing, f"tests/conftest.py names no such test module: {missing}"


def test_the_ray_modules_share_one_group_handed_out_first(request):
    items = request.session.items
    groups = {item.module.__name__: item.get_closest_marker("xdist_group").args[0]
              for item in items}
    assert all(groups[name] == RAY_GROUP for name in RAY_MODULES if name in groups)
    present = [group for group in SLOWEST_GROUPS_FIRST if group in groups.values()]
    first_seen = list(dict.fromkeys(item.get_closest_marker("xdist_group").args[0]
                                    for item in items))
    assert first_seen[:len(present)] == present

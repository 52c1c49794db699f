"""pytest across the repository's suites: which tests share a worker under `pytest -n 2` (.ci/run).

Tests that share an expensive fixture run on one worker, so the fixture is made once: the
modules of `MODULE_GROUPS` and the tests of each quantized configuration in
export/tests/test_quantize.py (its conversion and transformers' references; the two
configurations balance the two workers). Every other test goes wherever a worker is free.

pytest-xdist's own `--dist loadgroup` would do this from `xdist_group` marks, but xdist 3.8.0
marks a test by rewriting `item._nodeid`, which pytest 9.2 no longer reads: the marks are ignored
and the tests spread over both workers.
"""

from __future__ import annotations

import re

# Modules whose tests share one module- or session-scoped fixture that takes minutes.
MODULE_GROUPS = {
    "bench/tests/test_bench.py": "bench",  # the whole benchmark
    "train/tests/test_release.py": "release",  # the evaluation slice through the binary and transformers
    "deploy/tests/test_bundle.py": "bundle",  # the dist build and the bundle
}


def worker_group(nodeid: str) -> str:
    """The unit of scheduling `nodeid` belongs to: a group name, or the test itself."""
    for module, group in MODULE_GROUPS.items():
        if nodeid.startswith(f"{module}::"):
            return group
    if nodeid.startswith("export/tests/test_quantize.py::"):
        config = re.search(r"\[([a-z0-9]+)", nodeid)
        if config:
            return f"quantize-{config.group(1)}"
    return nodeid


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

    return GroupScheduling(config, log)

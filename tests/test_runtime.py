"""attnzoo.runtime: the huge-page malloc setting and the re-execution that applies it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnzoo import runtime

ROOT = Path(__file__).resolve().parents[1]
PRINT_TUNABLES = (
    "import os, sys; from attnzoo import runtime; runtime.reexec_with_hugepages(default=sys.argv[1] == 'on'); "
    "print(repr(os.environ.get('GLIBC_TUNABLES')), sys.argv[2:])"
)


def test_environment_appends_the_tunable_and_keeps_others():
    assert runtime.hugepage_environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    env = runtime.hugepage_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "X": "1"}
    explicit = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert runtime.hugepage_environment(explicit) == explicit
    assert runtime.hugepages_enabled(explicit) and not runtime.hugepages_enabled({"GLIBC_TUNABLES": "a=1"})


def run_child(env_overrides, default="on"):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", runtime.OPT_OUT_VARIABLE)}
    env.update(env_overrides, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-c", PRINT_TUNABLES, default, "first", "second"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(not runtime.hugepages_useful(), reason="needs Linux, glibc and transparent huge pages")
def test_reexec_sets_the_tunable_and_keeps_the_arguments():
    assert run_child({}) == "'glibc.malloc.hugetlb=1' ['first', 'second']"
    # with default=False: only when ATTNZOO_HUGEPAGES=1
    assert run_child({}, default="off") == "None ['first', 'second']"
    assert run_child({runtime.OPT_OUT_VARIABLE: "1"}, default="off") == "'glibc.malloc.hugetlb=1' ['first', 'second']"


def test_reexec_respects_the_opt_out_and_an_existing_setting():
    assert run_child({runtime.OPT_OUT_VARIABLE: "0"}) == "None ['first', 'second']"
    assert run_child({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == "'glibc.malloc.hugetlb=0' ['first', 'second']"

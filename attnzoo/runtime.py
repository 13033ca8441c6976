"""Process settings that XLA:CPU needs to run at full speed, applied by re-executing the command.

XLA:CPU allocates each execution's temporary buffer afresh (about 0.5 GB for a ViT-Ti train step
at batch 8), and glibc serves an allocation that large with a new ``mmap``, so every step touches
every page of it for the first time. On the 2-core machine this project is developed on, a ViT-Ti
step took 126k page faults and spent 0.3 s of its 0.95 s in the kernel. glibc's tunable
``glibc.malloc.hugetlb=1`` makes malloc ask for transparent huge pages on those mappings: 300
faults per step, and the step took 0.69 s. Tunables are read when a process starts, so the command
is executed again with the tunable in its environment.

The benchmarks and ``python -m attnzoo.train`` call :func:`reexec_with_hugepages` first thing
(``ATTNZOO_HUGEPAGES=0`` turns it off). Another program can export the setting itself:
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_script.py``.
"""

from __future__ import annotations

import os
import platform
import sys

HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT_VARIABLE = "ATTNZOO_HUGEPAGES"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def hugepages_enabled(environ=None) -> bool:
    """Whether ``environ`` (default: this process's) sets ``glibc.malloc.hugetlb`` already."""
    environ = os.environ if environ is None else environ
    tunables = environ.get("GLIBC_TUNABLES", "")
    return any(item.startswith("glibc.malloc.hugetlb=") for item in tunables.split(":") if item)


def hugepage_environment(environ=None) -> dict[str, str]:
    """A copy of ``environ`` with :data:`HUGEPAGE_TUNABLE` appended to ``GLIBC_TUNABLES``.

    Other tunables are kept; an explicit ``glibc.malloc.hugetlb`` value is left as it is.
    """
    environ = dict(os.environ if environ is None else environ)
    if hugepages_enabled(environ):
        return environ
    current = environ.get("GLIBC_TUNABLES", "")
    environ["GLIBC_TUNABLES"] = f"{current}:{HUGEPAGE_TUNABLE}" if current else HUGEPAGE_TUNABLE
    return environ


def hugepages_useful(default: bool = True) -> bool:
    """Linux with glibc, transparent huge pages not switched off, and ``ATTNZOO_HUGEPAGES`` set
    to 1 (or unset when ``default``)."""
    if os.environ.get(OPT_OUT_VARIABLE, "1" if default else "0") != "1":
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        with open(_THP_SETTING) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def reexec_with_hugepages(default: bool = True) -> None:
    """Re-executes this command (``sys.orig_argv``) with :data:`HUGEPAGE_TUNABLE` set.

    Returns without doing anything when the tunable is set already or
    :func:`hugepages_useful` (``default``) is false. Call it before any work: the process is
    replaced.
    """
    if hugepages_enabled() or not hugepages_useful(default):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], hugepage_environment())

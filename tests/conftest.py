"""Suite-wide fixtures.

Every compiled XLA:CPU executable keeps its machine code in memory mappings of its own (about 3 to 15
per executable, more for large programs), and JAX's caches keep every executable alive. A pytest-xdist
worker that runs half of this suite compiles tens of thousands of programs and reaches the kernel's
`vm.max_map_count` (65530): the next compilation then fails to map its code, and the C++ exception
that reports it crashes the worker inside the unwinder (a segmentation fault in `_Unwind_Find_FDE`).
Dropping JAX's caches after each test module releases those mappings.
"""

import gc

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    yield
    jax.clear_caches()
    gc.collect()

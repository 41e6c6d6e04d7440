"""The CPU memory allocator setting that training and sampling run with.

Every ODE evaluation allocates and frees tensors of a few megabytes. glibc's
malloc serves such blocks with fresh ``mmap`` pages (or returns the freed top
of its heap to the system), so the next evaluation's tensors fault their pages
in again, and the kernel zeroes every page first: an elementwise operation on
a fresh 4 MB output is then several times slower than on reused memory
(``bench/conv_kernels.py`` times both).
:func:`keep_freed_memory` makes malloc serve large blocks from its heap and
keep freed memory for reuse. The cost: the process's resident memory no longer
shrinks, and its peak grows (freed blocks of one size are not all reused for
another). ``train.py``, ``sample.py`` and the benchmarks apply it as
``train.keep_freed_memory`` says (:func:`enabled_for`): by default to image models
only, since the 2-D toy model's tensors are small and a timing check showed it no
faster there.
"""

from __future__ import annotations

import ctypes
import sys

from cnf.images import IMAGE_DATASETS
from cnf_prune.config import Config

# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ONE_GIB = 1 << 30


def keep_freed_memory() -> bool:
    """Serve blocks up to 1 GiB from malloc's heap and never give freed heap back
    to the system; ``True`` if applied (glibc on Linux), ``False`` elsewhere,
    where the allocator is left as it is."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _ONE_GIB)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def enabled_for(config: Config) -> bool:
    """``train.keep_freed_memory``; unset (null), whether the data are images."""
    setting = config.train.keep_freed_memory
    return config.data.name in IMAGE_DATASETS if setting is None else setting

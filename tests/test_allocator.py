"""The CPU allocator setting: freed tensor memory is reused, not faulted in again."""

import resource
import sys

import pytest
import torch

from cnf_prune.allocator import keep_freed_memory


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_kept_memory_is_reused_without_page_faults():
    if not keep_freed_memory():
        pytest.skip("not glibc")
    # 48 MiB, above the largest block glibc ever serves from its heap by default (32 MiB):
    # by default every one of these products is fresh mmap memory, each page faulted in.
    x = torch.ones(12 << 20)
    for _ in range(3):  # grow the heap once
        y = [x * 2 for _ in range(4)]
        del y
    before = _minor_faults()
    for _ in range(10):
        y = [x * 2 for _ in range(4)]
        del y
    pages_per_tensor = x.numel() * x.element_size() / resource.getpagesize()
    # Fresh memory would fault in every page of all 40 results (about 490000 faults).
    assert _minor_faults() - before < 0.05 * 40 * pages_per_tensor


def test_the_setting_defaults_to_image_data_and_can_be_forced():
    from cnf_prune.allocator import enabled_for
    from cnf_prune.config import load_config

    assert enabled_for(load_config(None, ["data.name=synthetic8"]))
    assert not enabled_for(load_config(None, ["data.name=checkerboard"]))
    assert enabled_for(load_config(None, ["data.name=checkerboard", "train.keep_freed_memory=true"]))
    assert not enabled_for(load_config(None, ["data.name=synthetic8", "train.keep_freed_memory=false"]))

"""keep_freed_host_memory: freed CPU tensors stay in the process, so the next step does not page-fault them in."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import rannc

# A step-like pattern: 8 MiB tensors and a 48 MiB one (say a large vocabulary's logits) alive at once, all freed
# at the step's end. glibc's defaults serve allocations above 32 MiB with mmap whatever it has seen, and give them
# back on free, so every step faults that memory in again.
SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from rannc.host_memory import keep_freed_host_memory

    if sys.argv[1] == "keep":
        assert keep_freed_host_memory() and keep_freed_host_memory()  # applies, once per process

    def faults_of_one_step():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        held = [torch.ones(2 * 2**20) for _ in range(6)] + [torch.ones(12 * 2**20)]  # touched page by page
        del held
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    print(*[faults_of_one_step() for _ in range(8)])
    """
)


def script_numbers(script: str, mode: str) -> list[int]:
    """The integers a script prints, run in a fresh interpreter (malloc settings are per process)."""
    result = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [int(x) for x in result.stdout.split()]


def step_faults(mode: str) -> list[int]:
    return script_numbers(SCRIPT, mode)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_memory_is_reused_without_page_faults() -> None:
    pages, large = (6 * 8 + 48) * 2**20 // 4096, 48 * 2**20 // 4096
    default, kept = step_faults("default"), step_faults("keep")
    assert default[0] > pages // 2 and kept[0] > pages // 2  # the first step's memory is new to the process
    # glibc's defaults give it back: every step faults all of it in again
    assert min(default[1:]) > pages // 2 and min(default[1:]) >= large * 0.9
    # kept: the heap may still grow in the next steps (fragmentation: at most the large tensor, once or twice),
    # then steps reuse it
    assert max(kept[1:]) <= large * 1.1 and max(kept[-4:]) < pages // 20
    assert sum(kept[1:]) < sum(default[1:]) / 4


def test_config_item_turns_it_off() -> None:
    assert rannc.Config().keep_host_memory is True
    assert rannc.Config().replace(keep_host_memory=False).keep_host_memory is False


# Many heap-sized (64 KiB) arrays freed while one allocated after them still lives: glibc keeps the freed pages
# (they are not at the heap's top) until malloc_trim.
TRIM_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np
    from rannc.host_memory import keep_freed_host_memory, return_freed_host_memory

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024

    if sys.argv[1] == "keep":
        keep_freed_host_memory()
    chunks = [np.ones(8192) for _ in range(3000)]
    pin = np.ones(8192)
    del chunks
    freed = rss()
    ran = return_freed_host_memory()
    print(int(ran), freed - rss())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_return_freed_host_memory_gives_pages_back_unless_kept() -> None:
    ran, returned = script_numbers(TRIM_SCRIPT, "plain")
    assert ran == 1 and returned > 100 * 2**20, returned  # ~188 MiB of the freed arrays
    ran, returned = script_numbers(TRIM_SCRIPT, "keep")
    assert ran == 0 and returned < 16 * 2**20  # a process that keeps memory on purpose is left alone


# Profiling a meta model block after block: each block gets new stand-in weights (16 MiB here) and gradients, freed
# before the next. With freed memory kept in the process, the heap fragments and grew by about a weight per block
# (a 1 GiB model's 4 ranks peaked at 0.56 GiB above their baseline, against 0.31 GiB when pages are given back).
# One timed run per block, also for a short one (`measure.SHORT_RUN_SAMPLES` set to 1): a short block's measurement
# otherwise takes three, the first block (slow while cold) one, and each run's accumulated gradient can add to the
# peak, so the first block's peak would not be the one compared.
PROFILE_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from rannc.host_memory import keep_freed_host_memory
    from rannc.profile.measure import BlockRunner, cache_flusher, measure_block
    import rannc.profile.measure
    rannc.profile.measure.SHORT_RUN_SAMPLES = 1

    def status_bytes(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    WIDTH = 2048  # a 16 MiB weight

    def block():
        def make_inputs(m):  # as for a model built on meta: a new stand-in weight at every call
            return [torch.randn(m, WIDTH), torch.randn(WIDTH, WIDTH).mul_(0.02).requires_grad_(True)]
        return BlockRunner(lambda x, w: (torch.tanh(x @ w),), make_inputs, frozenset({1}))

    keep_freed_host_memory()
    flush = cache_flusher(torch.device("cpu"))
    baseline = status_bytes("VmRSS")
    for _ in range(int(sys.argv[1])):
        measure_block(block(), [4], 1, torch.device("cpu"), flush=flush)
    print(status_bytes("VmHWM") - baseline)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_profiling_many_blocks_holds_one_blocks_memory() -> None:
    (one,) = script_numbers(PROFILE_SCRIPT, "1")
    (many,) = script_numbers(PROFILE_SCRIPT, "16")
    assert one >= 3 * 16 * 2**20  # weight, gradient and the gradient being accumulated: the test measures
    assert many - one < 8 * 2**20, (one, many)  # not a weight more, however many blocks (was +64 MiB)

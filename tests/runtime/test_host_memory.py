"""keep_freed_host_memory: freed CPU tensors stay in the process, so the next allocation does not page-fault."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import rannc

SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from rannc.runtime.host_memory import keep_freed_host_memory

    def faults_of_a_fresh_64mib_tensor():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(16 * 2**20)  # 64 MiB, touched page by page
        t.fill_(1.0)
        del t
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_a_fresh_64mib_tensor()
    default = faults_of_a_fresh_64mib_tensor()  # glibc returned the freed chunk to the OS: faults again
    applied = keep_freed_host_memory()
    assert keep_freed_host_memory() == applied  # once per process
    faults_of_a_fresh_64mib_tensor()
    kept = faults_of_a_fresh_64mib_tensor()  # the heap keeps it: no faults
    print(applied, default, kept)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_memory_is_reused_without_page_faults() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    applied, default, kept = result.stdout.split()
    assert applied == "True"
    pages = 64 * 2**20 // 4096
    assert int(default) > pages // 2  # without it every step faults its memory in again
    assert int(kept) < pages // 20


def test_config_item_turns_it_off() -> None:
    assert rannc.Config().keep_host_memory is True
    assert rannc.Config().replace(keep_host_memory=False).keep_host_memory is False

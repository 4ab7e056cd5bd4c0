"""sona_shm refuses, at import, machines whose memory order its cross-process hand-overs do not get."""

from __future__ import annotations

import sys

import pytest

from sona_shm.machine import check_machine

from support import run

pytestmark = pytest.mark.guarantee("only-x86-64")


@pytest.mark.parametrize("machine", ["x86_64", "AMD64", "amd64"])
def test_x86_64_with_a_64_bit_python_is_accepted(machine):
    check_machine(machine, 64)


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "armv7l", "ppc64le", "riscv64", "s390x", "i686", ""])
def test_every_other_cpu_is_refused_by_name(machine):
    with pytest.raises(ImportError, match=f"sona_shm runs only on x86-64, this machine is '{machine or 'unknown'}'"):
        check_machine(machine, 64)


def test_a_32_bit_python_is_refused():
    with pytest.raises(ImportError, match="sona_shm needs a 64-bit Python, this one is 32-bit"):
        check_machine("x86_64", 32)


def test_importing_on_another_cpu_fails_with_that_message():
    script = "import platform; platform.machine = lambda: 'aarch64'; import sona_shm"
    done = run([sys.executable, "-c", script], timeout=60)
    assert done.returncode == 1
    assert "ImportError: sona_shm runs only on x86-64, this machine is 'aarch64'" in done.stderr

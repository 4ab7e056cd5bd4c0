"""A FIFO squatting an engine's name in /dev/shm: every command that reads an engine answers at once instead of hanging.

``mkfifo /dev/shm/sona_shm.NAME`` needs no privilege (/dev/shm is writable by every
user), and a plain read-only ``open()`` of a FIFO waits for a writer forever. Each
command runs in a subprocess with a timeout, so a regression fails the test (the
subprocess is killed) instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from sona_shm.cli import EXIT_LAYOUT_MISMATCH, EXIT_OK
from sona_shm.shm.segment import segment_file

from support import run

pytestmark = pytest.mark.guarantee("nothing-waits-forever")

#: Seconds a command may take; a hang on the FIFO is what this catches (the command answers in well under a second).
TIMEOUT = 60


def sona_shm(*argv: str):
    return run([sys.executable, "-m", "sona_shm", *argv], timeout=TIMEOUT)


@pytest.fixture
def fifo(name):
    """A FIFO at engine ``name``'s segment path (removed with the name after the test)."""
    os.mkfifo(segment_file(name), 0o600)
    return name


def refused(done, name: str) -> None:
    """The command refused the FIFO with exit 5 and a message naming the file, what it is, and how to remove it."""
    assert done.returncode == EXIT_LAYOUT_MISMATCH, (done.returncode, done.stdout, done.stderr)
    assert f"{segment_file(name)}: expected a regular file, got a FIFO (named pipe)" in done.stderr, done.stderr
    assert "not a sona_shm engine, nothing was used" in done.stderr
    assert f"sona-shm destroy --name {name}" in done.stderr


FORMS = {"table": (), "json": ("--json",), "prometheus": ("--prometheus",), "interval": ("--interval", "0.01")}


@pytest.mark.parametrize("form", FORMS.values(), ids=FORMS.keys())
def test_stats_refuses_a_fifo(fifo, form):
    refused(sona_shm("stats", "--name", fifo, *form), fifo)


def test_stats_watch_refuses_a_fifo(fifo):
    refused(sona_shm("stats", "--name", fifo, "--watch", "0.01", "--count", "2"), fifo)


def test_checkpoint_refuses_a_fifo(fifo, tmp_path):
    refused(sona_shm("checkpoint", "--name", fifo, "--out", str(tmp_path / "c.safetensors")), fifo)
    assert not (tmp_path / "c.safetensors").exists()


def test_export_refuses_a_fifo(fifo, tmp_path):
    refused(sona_shm("export", "--name", fifo, "--peft", str(tmp_path / "peft")), fifo)
    assert not (tmp_path / "peft").exists()


def test_destroy_removes_a_fifo_without_opening_it(fifo):
    """What the refusals recommend: destroy removes the squatter (it is not an engine: no flusher or lane to protect)."""
    done = sona_shm("destroy", "--name", fifo)
    assert done.returncode == EXIT_OK, (done.stdout, done.stderr)
    assert f"removed /sona_shm.{fifo}" in done.stdout
    assert not os.path.lexists(segment_file(fifo))


def test_list_reports_a_fifo_as_unreadable_and_every_other_engine(procs, names):
    fifo, live = names(2)
    os.mkfifo(segment_file(fifo), 0o600)
    procs.flusher(live, "--hidden-dim", "8", "--capacity", "4", "--lanes", "2", "--lane-slots", "4")
    done = sona_shm("list", "--json")
    assert done.returncode == EXIT_OK, done.stderr
    listed = {e["name"]: e for e in json.loads(done.stdout)}
    assert listed[live]["state"] == "alive" and listed[live]["hidden_dim"] == 8
    assert listed[fifo]["state"] == "unreadable" and listed[fifo]["size_bytes"] == 0
    assert "expected a regular file, got a FIFO (named pipe)" in listed[fifo]["reason"]

    done = sona_shm("list")
    assert done.returncode == EXIT_OK, done.stderr
    assert f"  {fifo}: {segment_file(fifo)}: expected a regular file, got a FIFO" in done.stdout
    assert any(line.split()[:2] == [live, "alive"] for line in done.stdout.splitlines()), done.stdout


def test_a_prometheus_scrape_raises_at_once_instead_of_hanging(fifo):
    """The collector's error is the segment's (another engine's collector in the same registry is unaffected)."""
    code = (
        "import sys\n"
        "from prometheus_client import CollectorRegistry, generate_latest\n"
        "from sona_shm import UntrustedSegmentError\n"
        "from sona_shm.prometheus import EngineCollector\n"
        "registry = CollectorRegistry()\n"
        "registry.register(EngineCollector(sys.argv[1]))\n"
        "try:\n"
        "    generate_latest(registry)\n"
        "except UntrustedSegmentError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(0)\n"
        "sys.exit('the scrape did not refuse the FIFO')\n"
    )
    done = run([sys.executable, "-c", code, fifo], timeout=TIMEOUT)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "expected a regular file, got a FIFO (named pipe)" in done.stdout


def test_attach_and_a_flusher_refuse_a_fifo_too(fifo):
    """Producers and the flusher open the name for writing (which never blocked on Linux); they refuse it alike."""
    code = (
        "import sys\n"
        "import sona_shm\n"
        "try:\n"
        "    sona_shm.attach(sys.argv[1], timeout=5)\n"
        "except sona_shm.UntrustedSegmentError as exc:\n"
        "    print(exc)\n"
    )
    done = run([sys.executable, "-c", code, fifo], timeout=TIMEOUT)
    assert "expected a regular file, got a FIFO" in done.stdout, (done.stdout, done.stderr)
    flusher = sona_shm("flusher", "--name", fifo, "--hidden-dim", "8", "--quiet")
    refused(flusher, fifo)

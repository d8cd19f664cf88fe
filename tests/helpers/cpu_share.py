"""Sharing the machine's cores between pytest-xdist workers.

Every test holds a shared lock while it runs; a test that needs the cores to itself (several
rank processes, a whole pipeline of processes) holds it exclusively: it waits for the other
worker's current test and runs alone, so single-process tests run two at a time and
multi-process tests never compete with each other. Without xdist this is all a no-op.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile

_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
_fd = None
_whole_test_exclusive = False  # the running test is marked exclusive


def _lock_fd() -> int:
    global _fd
    if _fd is None:
        path = os.path.join(tempfile.gettempdir(), f"gpas-tests-{_RUN}.lock")
        _fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    return _fd


@contextlib.contextmanager
def hold(exclusive: bool):
    """The lock for one test (shared, or exclusive for one that uses every core)."""
    if _RUN is None:
        yield
        return
    global _whole_test_exclusive
    fcntl.flock(_lock_fd(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    _whole_test_exclusive = exclusive
    try:
        yield
    finally:
        _whole_test_exclusive = False
        fcntl.flock(_lock_fd(), fcntl.LOCK_UN)


@contextlib.contextmanager
def exclusive():
    """Inside a test: take the cores for a multi-process part (the shared lock is converted,
    then converted back). In a test marked ``exclusive`` it does nothing: that test holds the
    cores to its end, and converting back would hand them over halfway."""
    if _RUN is None or _whole_test_exclusive:
        yield  # a test marked exclusive keeps the cores to its end
        return
    fcntl.flock(_lock_fd(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(_lock_fd(), fcntl.LOCK_SH)

"""A worker asked for a precision it cannot run refuses to start, and says what it needs."""

from __future__ import annotations

import sys

import pytest
from conftest import Proc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_engine_precision_without_engines_is_a_clear_startup_error(services):
    proc = Proc("worker-fp8", [sys.executable, "-m", "workers", "--model", "tiny", "--device", "cpu",
                               "--precision", "fp8", "--metrics-port", "0"], services.env(), services.workdir)
    services.procs.append(proc)
    assert proc.popen.wait(timeout=240) == 2
    log = proc.log()
    assert "error: --precision fp8 needs --engine DIR" in log and "Traceback" not in log
    client = services.redis.client()
    assert client.zcard("sana:workers") == 0  # it never registered as serving
    client.close()

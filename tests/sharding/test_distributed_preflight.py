"""The multi-process pre-flight: processes that disagree on the count fail clearly, fast."""

import socket
import threading

import pytest

from jaxpass.sharding.distributed import DistributedConfigError, preflight


def _free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _run(configs, timeout=5.0):
    """Runs preflight for each (num_processes, process_id) in a thread; returns their outcomes."""
    port = _free_port()
    out = [None] * len(configs)

    def go(i, n, pid):
        try:
            preflight(f"localhost:{port - 1}", n, pid, timeout=timeout)
            out[i] = "ok"
        except DistributedConfigError as e:
            out[i] = str(e)

    threads = [threading.Thread(target=go, args=(i, n, pid)) for i, (n, pid) in enumerate(configs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    return out


def test_agreeing_processes_pass():
    assert _run([(3, 0), (3, 1), (3, 2)]) == ["ok", "ok", "ok"]


def test_a_different_count_fails_in_every_process():
    out = _run([(2, 0), (3, 1)])
    assert all("num_processes=3" in o and "num_processes=2" in o for o in out), out


def test_a_missing_process_is_named_after_the_timeout():
    out = _run([(3, 0), (3, 2)], timeout=1.5)
    assert "missing process ids [1]" in out[0] and "missing process ids [1]" in out[1], out


def test_duplicate_or_out_of_range_ids():
    # process 0 waits for two peers; the two that both say id 1 are caught, every process told
    out = _run([(3, 0), (3, 1), (3, 1)], timeout=5.0)
    assert all("process id 1 given twice" in o for o in out), out
    with pytest.raises(DistributedConfigError, match="process_id=2 must be in"):
        preflight("localhost:1234", 2, 2)
    with pytest.raises(DistributedConfigError, match="host:port"):
        preflight("localhost", 2, 1)

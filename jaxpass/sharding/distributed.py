"""Multi-process start-up: a pre-flight check of the process count, then ``jax.distributed``.

Why a pre-flight: when processes disagree on the process count (one started with
``num_processes=2``, another with 3, or one of two never started), ``jax.distributed.initialize``
fails inside XLA's rendezvous, which aborts the process after its timeout with a message about
``RegisterTask``, out of Python's reach. Here process 0 first listens on the coordinator's host at
``port + 1`` (``preflight_port``); every other process connects and says which count and id it was
given. Process 0 checks that all agree (same count, distinct ids in range, everyone present within
the timeout) and answers every process with "ok" or the reason, so a mismatch is a clear
``DistributedConfigError`` in every process, before anything is initialized or compiled.
"""

from __future__ import annotations

import json
import socket
import time


class DistributedConfigError(RuntimeError):
    """The processes of a multi-process run disagree on the run's configuration."""


def _split(coordinator: str) -> tuple[str, int]:
    host, sep, port = coordinator.rpartition(":")
    if not sep or not port.isdigit():
        raise DistributedConfigError(f"coordinator {coordinator!r}: expected host:port")
    return host or "localhost", int(port)


def _send(sock, obj) -> None:
    sock.sendall(json.dumps(obj).encode() + b"\n")


def _recv(sock, deadline: float):
    buf = b""
    while not buf.endswith(b"\n"):
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return json.loads(buf)


def preflight(coordinator: str, num_processes: int, process_id: int, *, timeout: float = 60.0,
              port: int | None = None) -> None:
    """Checks that all processes agree on ``num_processes`` (see module docstring).

    Raises DistributedConfigError naming the disagreement, or a process that did not show up
    within ``timeout`` seconds. ``port`` defaults to the coordinator's port + 1.
    """
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise DistributedConfigError(
            f"process_id={process_id} must be in [0, num_processes={num_processes})")
    if num_processes == 1:
        return
    host, cport = _split(coordinator)
    port = cport + 1 if port is None else port
    deadline = time.monotonic() + timeout
    if process_id == 0:
        _serve(host, port, num_processes, deadline, timeout)
    else:
        _join(host, port, num_processes, process_id, deadline, timeout)


def _serve(host, port, n, deadline, timeout) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("" if host in ("localhost", "127.0.0.1") else host, port))
    srv.listen(n)
    conns, seen, error = [], set(), None
    try:
        while len(seen) < n - 1 and error is None:
            srv.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                missing = sorted(set(range(1, n)) - seen)
                error = (f"only {len(seen) + 1} of num_processes={n} processes joined within "
                         f"{timeout:g} s (missing process ids {missing}): were all of them "
                         "started, with the same coordinator?")
                break
            conns.append(conn)
            try:
                hello = _recv(conn, deadline)
            except (OSError, ValueError):
                continue
            pid, their_n = hello.get("process_id"), hello.get("num_processes")
            if their_n != n:
                error = (f"process {pid} was started with num_processes={their_n}, process 0 with "
                         f"num_processes={n}: give every process the same count")
            elif pid in seen or not isinstance(pid, int) or not 0 < pid < n:
                error = f"process id {pid} given twice or out of range for num_processes={n}"
            else:
                seen.add(pid)
    finally:
        for conn in conns:
            try:
                _send(conn, {"error": error} if error else {"ok": True})
            except OSError:
                pass
            conn.close()
        srv.close()
    if error:
        raise DistributedConfigError(error)


def _join(host, port, n, pid, deadline, timeout) -> None:
    last = None
    while time.monotonic() < deadline:
        try:
            sock = socket.create_connection((host, port), timeout=max(0.05, deadline - time.monotonic()))
        except OSError as e:  # process 0 not listening yet
            last = e
            time.sleep(0.2)
            continue
        with sock:
            _send(sock, {"process_id": pid, "num_processes": n})
            try:  # process 0 answers at the latest at the shared deadline: wait a little longer
                reply = _recv(sock, deadline + 5.0)
            except (OSError, ValueError) as e:
                raise DistributedConfigError(
                    f"process 0 at {host}:{port} gave no answer within {timeout:g} s ({e})") from e
        if reply.get("error"):
            raise DistributedConfigError(reply["error"])
        return
    raise DistributedConfigError(
        f"process {pid}: process 0 never listened at {host}:{port} within {timeout:g} s "
        f"({last}); is it running, with the same coordinator?")


def initialize(coordinator: str, num_processes: int, process_id: int, *, timeout: float = 60.0,
               preflight_port: int | None = None) -> None:
    """``preflight`` then ``jax.distributed.initialize`` with the same arguments."""
    import jax

    preflight(coordinator, num_processes, process_id, timeout=timeout, port=preflight_port)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=int(timeout))
    if jax.process_count() != num_processes:
        raise DistributedConfigError(
            f"the coordinator at {coordinator} reports {jax.process_count()} processes, this "
            f"process was started with num_processes={num_processes}")

"""Training slots across flow runs: one Prefect global concurrency limit per machine and
kind of device, so that studies run side by side on one machine (two `aemnist run`s, a
deployment run beside a local one) together train no more models at once than the config
allows.

Each study sets the limit of its machine's slots from its resolved config as it starts
(``runtime.gpu_concurrency`` on a GPU, ``runtime.workers`` on the CPU, one per core when
0), and each training task (grid fold, sweep size, final model) holds one slot for its
whole body, its nested MLflow run inside: that run's span is the time it held the slot
(training, and the final model's evaluation, which keeps the model on the device), never
time spent waiting for one. A task whose result is reused never runs its body, so a cached
re-run takes no slot. The limits live on the Prefect server: they span flow runs that
share one (``aemnist server``, PREFECT_API_URL). A run on its own temporary server shares it
with no other study, and takes no slots (the flow's ``share_slots=False``): its task runner
bounds it, and a global limit costs each contended acquisition a poll of seconds (Prefect's
Retry-After), measured as up to 11 s more flow time on a smoke run.

A slot is a lease of the limit, asked for and given back over Prefect's API as Prefect's
``concurrency()`` does, but not through Prefect's client: on a SQLite-backed server (the
default of `aemnist server`) the request often meets the server's own write of the task's
Running state, and the server answers 503 (its read-then-write transaction found the
database locked). Prefect's client asks again after 2 s, then 4 s: 1.8 to 2.4 s lost by most
training tasks of a smoke study on such a server (none on a PostgreSQL-backed one). Here a
503 is asked again after 50 ms, 100 ms, then every 200 ms (bench/slots.py measures both)."""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prefect.client.orchestration import get_client
from prefect.exceptions import MissingContextError, ObjectAlreadyExists
from prefect.logging import get_run_logger
from prefect.runtime import task_run
from prefect.settings import get_current_settings

from aemnist.machine_slots import MachineSlots, machine_slot
from deployments.servers import prefect_request

LIMITS = "/v2/concurrency_limits"  # Prefect's API of global concurrency limits
# Prefect's lease on a slot (its `concurrency()` default), renewed at three quarters of it
# while the task trains: a process killed holding one frees it within this time.
LEASE_S = 300.0
RENEW_S = LEASE_S * 0.75
# The waits before each new request after a 503 (a busy database: a write lasts
# milliseconds): 50 and 100 ms, then every 200 ms; 51 s in all, as long as Prefect's client
# would try (2 + 4 + 8 + 16 + 32 s: five retries).
BUSY_WAITS_S = (0.05, 0.1) + (0.2,) * 254


def _kind(device: str) -> str:
    return "gpu" if device == "cuda" else "cpu"


def slots_name(device: str) -> str:
    """The limit of this machine's ``device`` (cpu or cuda): ``aemnist-gpu-HOST`` or
    ``aemnist-cpu-HOST``."""
    return f"aemnist-{_kind(device)}-{socket.gethostname()}"


def machine_slots(device: str, slots: int) -> MachineSlots:
    """This machine's slot lock files for ``device``, ``slots`` of them (a study with fewer
    uses the first ones: together the studies train at most the largest count at once)."""
    return MachineSlots(f"aemnist-{_kind(device)}", slots)


def set_training_slots(device: str, slots: int) -> str:
    """Create this machine's limit for ``device`` with ``slots`` slots, or set an existing
    one's to that (the last study to start sets it); returns its name."""
    name = slots_name(device)
    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, slots)
        except ObjectAlreadyExists:
            # Another study created it between Prefect's read and create: set it now.
            client.upsert_global_concurrency_limit_by_name(name, slots)
    return name


@contextmanager
def training_slot(limit: str | MachineSlots | None) -> Iterator[None]:
    """Hold one slot of the machine's training-slot ``limit`` (a Prefect global concurrency
    limit's name, the machine's slot lock files, or None: none to hold) while the body runs;
    waits for one to be free. On a Prefect limit the running task run is recorded as the
    slot's holder (the Prefect UI shows it); where that limit does not exist (a Dask worker
    on another machine), Prefect logs a warning and the body runs without a slot."""
    if limit is None:
        yield
        return
    if isinstance(limit, MachineSlots):
        with machine_slot(limit):
            yield
        return
    with prefect_slot(limit):
        yield


class SlotServerBusy(RuntimeError):
    """The Prefect server answered 503 to every request about a slot."""


@contextmanager
def prefect_slot(limit: str) -> Iterator[None]:
    """Hold one slot of the Prefect global concurrency limit ``limit`` while the body runs:
    a lease taken once a slot is free (the running task run, if any, its holder), renewed
    while the body runs, given back after it."""
    api = get_current_settings().api
    url = str(api.url)
    auth = api.auth_string.get_secret_value() if api.auth_string else None
    lease_id = _take_lease(url, auth, limit)
    if lease_id is None:  # Prefect's own words and level for a missing limit
        _logger().warning("Concurrency limits %r do not exist - skipping acquisition.", [limit])
        yield
        return
    stop = threading.Event()
    renewer = threading.Thread(
        target=_renew_lease,
        args=(url, auth, lease_id, stop),
        name=f"slot-lease-{lease_id}",
        daemon=True,  # never keeps a stopping process alive: the lease then ends on its own
    )
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        try:
            _ask(url, auth, "decrement-with-lease", {"lease_id": lease_id})
        except (OSError, ValueError, SlotServerBusy) as exc:  # the work is done: not failed
            _logger().warning(
                "could not give back the slot of %s (%s); it frees itself within %.0f s",
                limit, exc, LEASE_S,
            )  # fmt: skip


def _take_lease(url: str, auth: str | None, limit: str) -> str | None:
    """A lease on one slot of ``limit``, once one is free; None where no such limit exists."""
    body: dict[str, Any] = {
        "names": [limit], "slots": 1, "mode": "concurrency", "lease_duration": LEASE_S,
    }  # fmt: skip
    if task_run.id:
        body["holder"] = {"type": "task_run", "id": str(task_run.id)}
    while True:
        try:
            answer = _ask(url, auth, "increment-with-lease", body)
        except urllib.error.HTTPError as exc:
            if exc.code != 423:
                raise
            # Every slot held: ask again when the server says (its limit's mean occupancy).
            time.sleep(float(exc.headers.get("Retry-After") or 1.0))
            continue
        return answer["lease_id"] if answer["limits"] else None


def _renew_lease(url: str, auth: str | None, lease_id: str, stop: threading.Event) -> None:
    """Renew the lease every RENEW_S until ``stop`` is set; a failed renewal is logged and
    tried again at the next turn (the lease still has a quarter of its time)."""
    while not stop.wait(RENEW_S):
        try:
            _ask(url, auth, f"leases/{lease_id}/renew", {"lease_duration": LEASE_S})
        except (OSError, ValueError, SlotServerBusy) as exc:
            _logger().warning("could not renew the training slot's lease %s: %s", lease_id, exc)


def _ask(url: str, auth: str | None, path: str, body: dict[str, Any]) -> Any:
    """POST ``body`` to the limits API's ``path``; after a 503 (the server's database busy)
    asked again after each of BUSY_WAITS_S."""
    busy = 0
    while True:
        try:
            answer = prefect_request(url, f"{LIMITS}/{path}", body, auth=auth)
        except urllib.error.HTTPError as exc:
            if exc.code != 503:
                raise
            if busy == len(BUSY_WAITS_S):
                raise SlotServerBusy(
                    f"the Prefect server at {url} answered 503 (busy) to {busy + 1} requests "
                    f"({path}) over {sum(BUSY_WAITS_S):.0f} s: see its log (`aemnist server` "
                    f"writes WORKDIR/server/prefect-server.log)"
                ) from None
            time.sleep(BUSY_WAITS_S[busy])
            busy += 1
            continue
        if busy:
            _logger().debug("%s answered after %d answers 503 (busy database)", path, busy)
        return answer


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The task run's logger (its lines in the Prefect UI), else this module's."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)

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
Retry-After), measured as up to 11 s more flow time on a smoke run."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists
from prefect.runtime import task_run

from aemnist.machine_slots import MachineSlots, machine_slot


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
    holder = ConcurrencyLeaseHolder(type="task_run", id=task_run.id) if task_run.id else None
    with concurrency(limit, occupy=1, holder=holder):
        yield

"""What a training slot costs each training task: taking and giving back one slot of the
machine's global concurrency limit (tasks/slots.py) on a temporary Prefect server (SQLite,
as `aemnist server` runs by default), against a plain API read on the same server; then
the same inside flows, where each task's start makes the server write (its Running state):
tasks taking a slot with Prefect's own ``concurrency()`` (the baseline) and with
``training_slot``, flows of each kind in turn.

    python bench/slots.py [--rounds 30] [--flows 4] [--tasks 6]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import announce, result, spread  # also puts the repo on the path


def timed(action: Callable[[], object], rounds: int) -> str:
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - started)
    return f"{spread([x * 1000 for x in seconds])} ms (median [min, max] over {rounds})"


def flow_acquisitions(name: str, tasks: int, ours: bool) -> list[float]:
    """A flow of ``tasks`` tasks one at a time, each taking one slot of limit ``name``
    (0.2 s held); the ms each waited for its slot."""
    from prefect import flow, task
    from prefect.concurrency.sync import concurrency
    from prefect.task_runners import ThreadPoolTaskRunner

    from tasks.slots import training_slot

    @task
    def hold_slot() -> float:
        started = time.perf_counter()
        with training_slot(name) if ours else concurrency(name, occupy=1):
            waited = time.perf_counter() - started
            time.sleep(0.2)
        return waited * 1000

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=1))
    def slots_flow() -> list[float]:
        return [hold_slot.submit().result() for _ in range(tasks)]

    return slots_flow()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--flows", type=int, default=4, help="flows of each kind, in turn")
    parser.add_argument("--tasks", type=int, default=6, help="tasks of each flow")
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"  # the server stops before the last batch
    from deployments.servers import TemporaryPrefectServer

    with tempfile.TemporaryDirectory() as scratch:
        os.environ["PREFECT_HOME"] = scratch
        api = TemporaryPrefectServer(Path(scratch) / "prefect.db")
        api.ready()
        from prefect.client.orchestration import get_client

        from tasks.slots import set_training_slots, training_slot

        name = set_training_slots("cpu", 2)
        announce()
        with get_client(sync_client=True) as client:
            read = timed(lambda: client.read_global_concurrency_limit_by_name(name), args.rounds)
        print(f"plain API read (the limit):      {read}")
        print(f"set the limit (unchanged):       {timed(lambda: set_training_slots('cpu', 2), 5)}")

        def one_slot() -> None:
            with training_slot(name):  # the limit's name, as the flow passes it
                pass

        print(f"take and give back one slot:     {timed(one_slot, args.rounds)}")

        set_training_slots("cpu", 1)
        waits: dict[bool, list[float]] = {False: [], True: []}
        medians: dict[bool, list[float]] = {False: [], True: []}
        for k in range(2 * args.flows):
            ours = (k % 2 == 1) != (k // 2 % 2 == 1)  # ABBA: neither kind always first
            found = flow_acquisitions(name, args.tasks, ours)
            waits[ours] += found
            medians[ours].append(statistics.median(found))
        for ours, label in ((False, "Prefect's concurrency()"), (True, "training_slot")):
            print(
                f"in a flow, {label + ':':24} {spread(waits[ours])} ms a task (median [min, "
                f"max] over {len(waits[ours])} tasks of {args.flows} flows); flows' medians "
                f"{spread(medians[ours])} ms"
            )
        api.stop()
        result(
            "slot wait in a flow (median ms, training_slot against Prefect's concurrency())",
            statistics.median(waits[True]),
            "ms",
            statistics.median(waits[False]),
        )


if __name__ == "__main__":
    main()

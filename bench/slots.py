"""What a training slot costs each training task: taking and giving back one slot of the
machine's global concurrency limit (tasks/slots.py) on a temporary Prefect server, against a
plain API read on the same server.

    python bench/slots.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import announce, spread  # also puts the repo on the path


def timed(action: Callable[[], object], rounds: int) -> str:
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - started)
    return f"{spread([x * 1000 for x in seconds])} ms (median [min, max] over {rounds})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
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
        api.stop()


if __name__ == "__main__":
    main()

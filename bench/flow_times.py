"""Where a study's wall time went, from its Prefect database (read-only): the flow run's
wall time, each stage's wall time (first task start to last task end) and its task runs'
summed time, and the flow's time outside its tasks (its orchestration overhead).

    python bench/flow_times.py PREFECT_DB [--flow-run ID]   (default: the newest flow run)

For a run on a lent GPU, bench/gpu_session.sh brings the database back ($OUT/prefect.db),
with machine.txt beside it: what the study ran on, which this script prints first (not the
machine it reads the database on).
"""

from __future__ import annotations

import argparse
import sqlite3
from contextlib import closing
from datetime import datetime
from pathlib import Path

# The task functions (tasks/) of each stage, in flow order: a task run's key is the
# function's name, a dash and a hash.
STAGES = {
    "open study": ("open_study",),
    "download": ("download",),
    "folds": ("assign_folds",),
    "grid": ("grid_fold", "grid_stack"),
    "grid summary": ("summarise_grid",),
    "sweep": ("sweep_size", "sweep_stack"),
    "sweep summary": ("summarise_sweep",),
    "final": ("final_model",),
    "corruption": ("evaluate_corruption",),
    "embedding": ("map_embedding",),
    "report": ("write_report", "publish_results", "close_study"),
}


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database")
    parser.add_argument("--flow-run", help="its id (default: the newest flow run)")
    args = parser.parse_args()
    with closing(sqlite3.connect(f"file:{args.database}?mode=ro", uri=True)) as db:
        query = "SELECT id, name, start_time, end_time, state_type FROM flow_run"
        if args.flow_run:
            flow = db.execute(query + " WHERE id = ?", (args.flow_run,)).fetchone()
        else:
            flow = db.execute(query + " ORDER BY start_time DESC LIMIT 1").fetchone()
        if flow is None:
            raise SystemExit(f"flow_times: no flow run in {args.database}")
        flow_id, name, start, end, state = flow
        tasks = db.execute(
            "SELECT task_key, name, start_time, end_time FROM task_run "
            "WHERE flow_run_id = ? AND start_time IS NOT NULL AND end_time IS NOT NULL",
            (flow_id,),
        ).fetchall()
    beside = Path(args.database).with_name("machine.txt")
    ran_on = beside.read_text().strip() if beside.is_file() else f"not recorded ({beside})"
    print(f"ran on: {ran_on}")
    wall = (_time(end) - _time(start)).total_seconds()
    print(f"flow run {name!r} ({state}): {wall:.1f} s")
    spans = []
    for stage, prefixes in STAGES.items():
        mine = [t for t in tasks if t[0].rsplit("-", 1)[0] in prefixes]
        if not mine:
            continue
        first = min(_time(t[2]) for t in mine)
        last = max(_time(t[3]) for t in mine)
        summed = sum((_time(t[3]) - _time(t[2])).total_seconds() for t in mine)
        spans.append((first, last))
        span = (last - first).total_seconds()
        print(f"  {stage:14s} {len(mine):4d} task runs, wall {span:7.1f} s, summed {summed:8.1f} s")
    # The time the flow run spent with no task of its running: its own work between tasks.
    busy, edge = 0.0, None
    for first, last in sorted(spans):
        if edge is None or first > edge:
            busy += (last - first).total_seconds()
            edge = last
        elif last > edge:
            busy += (last - edge).total_seconds()
            edge = last
    print(f"  outside any task: {wall - busy:.1f} s of {wall:.1f} s ({(wall - busy) / wall:.1%})")


if __name__ == "__main__":
    main()

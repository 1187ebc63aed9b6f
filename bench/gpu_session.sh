#!/bin/sh
# The paper study through the product on a lent GPU machine (issue 14 point 3), prepared
# here and run there in two calls of the device tool, which carries at most 64 MiB a call
# (tree included) while the offline bundle for Python 3.12 is 68 MB. The GPU machine has
# Python 3.12, torch with CUDA, numpy, pandas, pyarrow, scikit-learn and matplotlib, and no
# Prefect, MLflow or network.
#
# Here (the carried files go under .gl/, which git ignores):
#   aemnist bundle --python 3.12 --out .gl/bundle
#   sh bench/gpu_session.sh split .gl/bundle .gl        # .gl/part1, .gl/part2 (< 40 MB each)
# There (carry .gl/part1, then .gl/part2, on one warm machine):
#   sh bench/gpu_session.sh stage .gl/part1
#   sh bench/gpu_session.sh run .gl/part2               # installs, runs, exports to $OUT
#   sh bench/gpu_session.sh finish                      # only if `run` said the study runs on
#
# `run` reads: PROFILE (paper), DEVICE (cuda), CONFIG (bench/gpu_session.toml: the grid with
# one seed, the sweep and final model with three, what fits the 15 minutes a session has),
# NODE_PYTHON (install into that Python instead of a new venv over the system's: for a
# rehearsal on a CPU machine, see bench/README.md), and writes under $OUT: the exported run
# (results/paper/, results/paper.md), the flow's output, its Prefect database (task-run
# times), the GPU's utilisation once a second (gpu.csv) and the wall time of each step.
set -eu
stage_dir=/tmp/aemnist-wheels
venv=/tmp/aemnist-venv
workdir=/tmp/aemnist-paper

split() {  # BUNDLE DEST: the bundle's files in two parts, the larger wheels spread over both
    bundle=$1; dest=$2
    rm -rf "$dest/part1" "$dest/part2"; mkdir -p "$dest/part1" "$dest/part2"
    mnist=${AEMNIST_MNIST_MIRROR:-../shared/data/mnist}
    mkdir -p "$dest/part1/mnist" && cp "$mnist"/*-ubyte.gz "$dest/part1/mnist/"
    one=0; two=0
    for file in $(ls -S "$bundle"); do
        size=$(stat -c %s "$bundle/$file")
        if [ "$one" -le "$two" ]; then cp "$bundle/$file" "$dest/part1/"; one=$((one + size))
        else cp "$bundle/$file" "$dest/part2/"; two=$((two + size)); fi
    done
    echo "part1: $(du -sh "$dest/part1" | cut -f1) (with MNIST), part2: $(du -sh "$dest/part2" | cut -f1)"
}

stage() {  # PART: keep the first part's files on the machine until the second comes
    mkdir -p "$stage_dir" && cp -r "$1"/* "$stage_dir/"
    ls "$stage_dir" | wc -l
}

run_dir=/tmp/aemnist-run  # the study's log, times and exit code, across calls

run() {  # PART: install from both parts, start the study in the background, then finish
    : "${OUT:?set OUT to the folder that comes back}"
    cp -r "$1"/* "$stage_dir/"
    rm -rf "$run_dir" && mkdir -p "$run_dir"
    start=$(date +%s)
    if [ -n "${NODE_PYTHON:-}" ]; then
        python=$NODE_PYTHON
    else
        python3 -m venv --system-site-packages "$venv"
        python=$venv/bin/python
    fi
    PYTHON=$python sh "$stage_dir/install.sh" --quiet > "$run_dir/install.log" 2>&1 \
        || { tail -20 "$run_dir/install.log"; exit 1; }
    echo "$python" > "$run_dir/python"
    echo "install $(( $(date +%s) - start )) s" >> "$run_dir/times.txt"
    # A call of the device tool lasts at most 600 s and the study may take longer: it runs
    # on in its own session (setsid) between calls, and `finish` collects it.
    PREFECT_HOME=/tmp/aemnist-prefect AEMNIST_MNIST_MIRROR=$stage_dir/mnist \
        setsid sh -c '
            if command -v nvidia-smi > /dev/null; then
                nvidia-smi --query-gpu=timestamp,utilization.gpu,utilization.memory,memory.used \
                    --format=csv -l 1 > "$0/gpu.csv" 2>&1 & sampler=$!
            fi
            start=$(date +%s)
            "$1" run --profile "$2" --device "$3" --config "$4" --workdir "$5" > "$0/run.log" 2>&1
            echo $? > "$0/exit"
            echo "study $(( $(date +%s) - start )) s" >> "$0/times.txt"
            [ -n "${sampler:-}" ] && kill "$sampler"
        ' "$run_dir" "$(dirname "$python")/aemnist" "${PROFILE:-paper}" "${DEVICE:-cuda}" \
        "${CONFIG:-$PWD/bench/gpu_session.toml}" "$workdir" < /dev/null > /dev/null 2>&1 &
    finish
}

finish() {  # wait for the study (up to WAIT s, default 500), then bring everything back
    : "${OUT:?set OUT to the folder that comes back}"
    waited=0
    while [ ! -f "$run_dir/exit" ] && [ "$waited" -lt "${WAIT:-500}" ]; do
        sleep 5; waited=$((waited + 5))
    done
    cp "$run_dir"/*.log "$run_dir/times.txt" "$OUT/" 2>/dev/null || true
    [ -f "$run_dir/gpu.csv" ] && cp "$run_dir/gpu.csv" "$OUT/"
    if [ ! -f "$run_dir/exit" ]; then
        echo "still running after ${waited} s: call \`sh bench/gpu_session.sh finish\` again"
        tail -3 "$run_dir/run.log"; return 0
    fi
    [ "$(cat "$run_dir/exit")" = 0 ] || { tail -40 "$run_dir/run.log"; exit 1; }
    python=$(cat "$run_dir/python")
    # SQLite's backup: what is still in the write-ahead log comes too (a copy would lose it).
    "$python" -c "import sqlite3, sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))" \
        /tmp/aemnist-prefect/prefect.db "$OUT/prefect.db"
    mkdir -p "$OUT/results"
    start=$(date +%s)
    "$(dirname "$python")/aemnist" export --workdir "$workdir" \
        --out "$OUT/results/${PROFILE:-paper}" > "$OUT/export.log" 2>&1 \
        || { cat "$OUT/export.log"; exit 1; }
    echo "export $(( $(date +%s) - start )) s" | tee -a "$run_dir/times.txt" >> "$OUT/times.txt"
    tail -5 "$run_dir/run.log"; cat "$OUT/times.txt"
}

"$@"

#!/bin/sh
# The paper study through the product on a lent GPU machine (issue 14 point 3), prepared
# here and run there in a few calls of the device tool, which carries at most 64 MiB a call
# (tree included) while the offline bundle for Python 3.12 is 119 MB with pyarrow. The GPU
# machine has Python 3.12, torch 2.11 with CUDA, numpy, pandas, pyarrow, scikit-learn and
# matplotlib, and no Prefect, MLflow or network. Its pyarrow may be newer than MLflow 3.17.2
# allows (<26; pyarrow 26 came out in November 2026, a month after it), so the bundle carries
# pyarrow 25.0.1, which pip installs only if the machine's does not fit (its wheels need
# glibc 2.28, which Ubuntu 24.04's 2.39 is).
#
# Here (the carried files go under .gl/, which git ignores):
#   aemnist bundle --python 3.12 --platform manylinux_2_28_x86_64 --include pyarrow --out .gl/bundle
#   sh bench/gpu_session.sh split .gl/bundle .gl        # .gl/part1 .. partN, each < PART_MB
# There (carry each part in its own call, on one warm machine; split prints the calls):
#   sh bench/gpu_session.sh stage .gl/part1             # every part but the last
#   sh bench/gpu_session.sh run .gl/partN               # installs, runs, exports to $OUT
#   sh bench/gpu_session.sh finish                      # only if `run` said the study runs on
#
# `run` reads: PROFILE (paper), DEVICE (cuda), CONFIG (default: bench/gpu_session.toml, the
# grid with one seed, the sweep and final model with three, what fits the 15 minutes a session
# has; or bench/gpu_session_stacked.toml, the grid and the sweep stacked, with up to three
# grid seeds and five sweep seeds, as many as a probe's stacked rate on the GPU fits in
# TRAIN_SECONDS (310; bench/gpu_session_choice.py);
# PROBE_MODELS runs that probe on another device, with that many cells, for a rehearsal),
# NODE_PYTHON (install into that Python instead of a new venv over the system's: for a
# rehearsal on a CPU machine, see bench/README.md), and writes under $OUT: the exported run
# (results/paper/, results/paper.md), the flow's output, its Prefect database (task-run
# times), the GPU's utilisation once a second (gpu.csv) and the wall time of each step.
set -eu
stage_dir=/tmp/aemnist-wheels
venv=/tmp/aemnist-venv
workdir=/tmp/aemnist-paper

split() {  # BUNDLE DEST: the bundle's files and MNIST in as few parts as fit PART_MB (56)
    bundle=$1; dest=$2
    mnist=${AEMNIST_MNIST_MIRROR:-../shared/data/mnist}
    limit=$(( ${PART_MB:-56} * 1000000 ))  # the call's 64 MiB less the tree (1.7 MB)
    total=$(cat "$bundle"/* "$mnist"/*-ubyte.gz | wc -c)
    parts=$(( (total + limit - 1) / limit ))
    [ "$parts" -ge 2 ] || parts=2
    rm -rf "$dest"/part[0-9]*
    i=1; while [ "$i" -le "$parts" ]; do mkdir -p "$dest/part$i"; i=$((i + 1)); done
    mkdir -p "$dest/part1/mnist" && cp "$mnist"/*-ubyte.gz "$dest/part1/mnist/"
    # The largest files first, each into the part that holds least so far.
    for file in $(ls -S "$bundle"); do
        lightest=1; least=-1; i=1
        while [ "$i" -le "$parts" ]; do
            held=$(du -sb "$dest/part$i" | cut -f1)
            if [ "$least" -lt 0 ] || [ "$held" -lt "$least" ]; then lightest=$i; least=$held; fi
            i=$((i + 1))
        done
        cp "$bundle/$file" "$dest/part$lightest/"
    done
    i=1; while [ "$i" -le "$parts" ]; do
        held=$(du -sb "$dest/part$i" | cut -f1)
        [ "$held" -le "$limit" ] || { echo "part$i: $held bytes, over PART_MB"; exit 1; }
        verb=stage; [ "$i" -lt "$parts" ] || verb=run
        echo "part$i: $((held / 1000000)) MB: sh bench/gpu_session.sh $verb $dest/part$i"
        i=$((i + 1))
    done
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
        # The GPU machine's python3 is itself a virtual environment (/opt/torch/.venv): a venv
        # made from it sees the base interpreter's packages, not that venv's (torch among
        # them), so they are added by a .pth file, after the new venv's own.
        python3 - "$python" <<'EOF'
import pathlib, site, subprocess, sys
if sys.prefix != sys.base_prefix:
    purelib = subprocess.check_output(
        [sys.argv[1], "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
    ).strip()
    dirs = [d for d in site.getsitepackages() if pathlib.Path(d).is_dir()]
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in dirs)
    pathlib.Path(purelib, "aemnist-node-packages.pth").write_text(lines)
EOF
    fi
    PYTHON=$python sh "$stage_dir/install.sh" --quiet > "$run_dir/install.log" 2>&1 \
        || { tail -20 "$run_dir/install.log"; exit 1; }
    echo "$python" > "$run_dir/python"
    echo "install $(( $(date +%s) - start )) s" >> "$run_dir/times.txt"
    config=${CONFIG:-$PWD/bench/gpu_session.toml}
    if [ -z "${CONFIG:-}" ] && { [ "${DEVICE:-cuda}" = cuda ] || [ -n "${PROBE_MODELS:-}" ]; }; then
        # Issue 14 point 7 first: 36 cells stacked against the same cells one after another on
        # this GPU, one epoch each (about 30 s). bench/gpu_session_choice.py then takes the
        # stacked config (grid and sweep) with as many grid seeds (3, 2, 1), then sweep seeds
        # (5, 3), as fit TRAIN_SECONDS (310: the separate config's training on the last H200,
        # its grid 162 s and about 3 x 50 s for its sweep) at the probe's stacked rate, counting
        # no gain from tasks sharing the GPU; else the separate config. A crashed probe:
        # separate.
        start=$(date +%s)
        AEMNIST_MNIST_MIRROR=$stage_dir/mnist AEMNIST_BENCH_DIR=/tmp/aemnist-bench \
            "$python" bench/stacked.py --device "${DEVICE:-cuda}" --models "${PROBE_MODELS:-36}" \
            --epochs 1 --rounds 1 > "$run_dir/stacked-probe.log" 2>&1 || true
        # The sweep's padded sizes, which the probe above does not train, once on this device
        # (about 5 s): where they fail, the stacked config would fail its sweep.
        AEMNIST_MNIST_MIRROR=$stage_dir/mnist AEMNIST_BENCH_DIR=/tmp/aemnist-bench \
            "$python" bench/stacked.py --device "${DEVICE:-cuda}" --models 3 --sizes 2,6,30 \
            --epochs 1 --rounds 1 > "$run_dir/stacked-sizes-probe.log" 2>&1 || true
        config=$("$python" bench/gpu_session_choice.py "$run_dir/stacked-probe.log" \
            --check "$run_dir/stacked-sizes-probe.log" \
            --profile "${PROFILE:-paper}" --train-seconds "${TRAIN_SECONDS:-310}" \
            --separate "$config" --stacked "$PWD/bench/gpu_session_stacked.toml" \
            --scratch "$run_dir" 2>> "$run_dir/times.txt") || config=$PWD/bench/gpu_session.toml
        echo "stacked probe $(( $(date +%s) - start )) s, study config $config" >> "$run_dir/times.txt"
    fi
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
        "$config" "$workdir" < /dev/null > /dev/null 2>&1 &
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
    python=$(cat "$run_dir/python")
    # The Prefect database by SQLite's backup (what is still in the write-ahead log comes too;
    # a copy would lose it), also while the study runs on: should the device time end before
    # it does, the finished stages' task-run times have come back (bench/flow_times.py).
    "$python" -c "import sqlite3, sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))" \
        "$(find /tmp/aemnist-prefect "$workdir/server" -name prefect.db 2>/dev/null | head -1)" \
        "$OUT/prefect.db" 2>/dev/null || true
    # What the study ran on, for bench/flow_times.py (the study's parent run has it too).
    PYTHONPATH=$PWD/bench "$python" -c "from common import machine; print(machine('${DEVICE:-cuda}'))" \
        > "$OUT/machine.txt" 2>&1 || true
    if [ ! -f "$run_dir/exit" ]; then
        echo "still running after ${waited} s: call \`sh bench/gpu_session.sh finish\` again"
        tail -3 "$run_dir/run.log"; return 0
    fi
    [ "$(cat "$run_dir/exit")" = 0 ] || { tail -40 "$run_dir/run.log"; exit 1; }
    mkdir -p "$OUT/results"
    start=$(date +%s)
    "$(dirname "$python")/aemnist" export --workdir "$workdir" \
        --out "$OUT/results/${PROFILE:-paper}" > "$OUT/export.log" 2>&1 \
        || { cat "$OUT/export.log"; exit 1; }
    echo "export $(( $(date +%s) - start )) s" | tee -a "$run_dir/times.txt" >> "$OUT/times.txt"
    tail -5 "$run_dir/run.log"; cat "$OUT/times.txt"
}

"$@"

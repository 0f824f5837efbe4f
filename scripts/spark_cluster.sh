#!/usr/bin/env bash
# A Spark standalone cluster on this machine: one master and N workers on 127.0.0.1, run
# from the pyspark installed in the venv (the pip package has no sbin/start-*.sh, so each
# daemon is `bin/spark-class <Master|Worker>` in the background, its pid in a file).
#
#   scripts/spark_cluster.sh start     # start what is not running (idempotent: after a worker
#                                      #   was killed, `start` brings back only that worker)
#   scripts/spark_cluster.sh stop      # stop the daemons this script started, by their pids
#   scripts/spark_cluster.sh status    # exit 0 when the master and every worker run
#   scripts/spark_cluster.sh url       # print the master URL
#
# Layout under $DTT_CLUSTER_DIR (default .cluster/, gitignored):
#   master.pid, worker-<i>.pid         pids of the JVMs (spark-class execs java)
#   logs/master.log, logs/worker-<i>.log
#   worker-<i>/work/                   the worker's work dir: executors run there, their
#                                      stdout/stderr under work/<app-id>/<executor-id>/
#   worker-<i>/local/                  SPARK_LOCAL_DIRS of the worker's executors
# so that executors never share a working or temp directory with the driver.
#
# Environment (defaults in brackets): DTT_SPARK_MASTER_PORT [7077],
# DTT_SPARK_MASTER_WEBUI_PORT [18080], DTT_SPARK_WORKER_WEBUI_PORT [18081: worker i gets
# +i-1], DTT_SPARK_WORKERS [2], DTT_SPARK_WORKER_CORES [1], DTT_SPARK_WORKER_MEMORY [2g],
# DTT_SPARK_DAEMON_MEMORY [512m], DTT_CLUSTER_PYTHON [.venv/bin/python],
# DTT_CLUSTER_START_TIMEOUT [90 s].
#
# `stop` never kills by name: only the pids in its pid files, and only while that pid is
# still the daemon it started (its command line names the same class and cluster dir).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${DTT_CLUSTER_DIR:-$ROOT/.cluster}"
DIR="$(mkdir -p "$DIR" && cd "$DIR" && pwd -P)"   # physical path: compared with /proc/<pid>/cwd
MASTER_PORT="${DTT_SPARK_MASTER_PORT:-7077}"
MASTER_UI="${DTT_SPARK_MASTER_WEBUI_PORT:-18080}"
WORKER_UI="${DTT_SPARK_WORKER_WEBUI_PORT:-18081}"
WORKERS="${DTT_SPARK_WORKERS:-2}"
CORES="${DTT_SPARK_WORKER_CORES:-1}"
MEMORY="${DTT_SPARK_WORKER_MEMORY:-2g}"
PYTHON="${DTT_CLUSTER_PYTHON:-$ROOT/.venv/bin/python}"
TIMEOUT="${DTT_CLUSTER_START_TIMEOUT:-90}"
HOST=127.0.0.1
URL="spark://$HOST:$MASTER_PORT"

die() { echo "spark_cluster.sh: $*" >&2; exit 1; }

spark_home() {
    [[ -x "$PYTHON" ]] || die "no Python at $PYTHON (run 'make venv', or set DTT_CLUSTER_PYTHON)"
    "$PYTHON" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))'
}

# the daemons, as "name class"
daemons() {
    echo "master org.apache.spark.deploy.master.Master"
    for ((i = 1; i <= WORKERS; i++)); do echo "worker-$i org.apache.spark.deploy.worker.Worker"; done
}

# the pid in NAME's pid file if that process is alive and is still our daemon, else nothing
live_pid() {
    local name=$1 class=$2 pidfile="$DIR/$1.pid" pid
    [[ -f "$pidfile" ]] || return 0
    pid=$(<"$pidfile")
    [[ "$pid" =~ ^[0-9]+$ ]] || return 0
    # a recycled pid belongs to another process: ours names the daemon's class on its command
    # line and runs in the cluster dir (launch cds there)
    if [[ -r /proc/$pid/cmdline ]] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$class" \
        && [[ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" == "$DIR" ]]; then
        echo "$pid"
    fi
}

launch() {
    local name=$1 class=$2 home log="$DIR/logs/$1.log"
    home=$(spark_home)
    mkdir -p "$DIR/logs"
    local args=()
    if [[ $name == master ]]; then
        args=(--host "$HOST" --port "$MASTER_PORT" --webui-port "$MASTER_UI")
    else
        local i=${name#worker-} wdir="$DIR/$name"
        mkdir -p "$wdir/work" "$wdir/local"
        args=(--host "$HOST" --cores "$CORES" --memory "$MEMORY" --work-dir "$wdir/work"
              --webui-port $((WORKER_UI + i - 1)) "$URL")
    fi
    echo "=== $(date -u +%FT%TZ) starting $name" >>"$log"
    # the daemon runs in $DIR: live_pid tells it by that from a process that reused its pid
    (
        cd "$DIR"
        export SPARK_HOME="$home" SPARK_DAEMON_MEMORY="${DTT_SPARK_DAEMON_MEMORY:-512m}"
        export PYSPARK_PYTHON="$PYTHON"
        [[ $name == master ]] || export SPARK_LOCAL_DIRS="$DIR/$name/local" SPARK_WORKER_DIR="$DIR/$name/work"
        exec nohup "$home/bin/spark-class" "$class" "${args[@]}" </dev/null >>"$log" 2>&1
    ) &
    echo $! >"$DIR/$name.pid"
}

# wait until PATTERN appears in NAME's log after its last start banner
wait_for_log() {
    local name=$1 pattern=$2 class=$3 deadline=$((SECONDS + TIMEOUT))
    local log="$DIR/logs/$name.log"
    while ((SECONDS < deadline)); do
        if [[ -z "$(live_pid "$name" "$class")" ]]; then
            # the launching subshell has not exec'd into the daemon yet: still starting
            local pid
            pid=$(<"$DIR/$name.pid")
            if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
                sleep 0.5
                continue
            fi
            tail -n 30 "$log" >&2 || true
            die "$name exited during start-up (log: $log)"
        fi
        if awk '/^=== .* starting /{seen=0} index($0, p){seen=1} END{exit !seen}' p="$pattern" "$log"; then
            return 0
        fi
        sleep 1
    done
    tail -n 30 "$log" >&2 || true
    die "$name did not log '$pattern' within ${TIMEOUT}s (log: $log)"
}

start() {
    mkdir -p "$DIR"
    local started=()
    while read -r name class; do
        if [[ -n "$(live_pid "$name" "$class")" ]]; then
            echo "$name already running (pid $(live_pid "$name" "$class"))"
            continue
        fi
        launch "$name" "$class"
        started+=("$name")
        if [[ $name == master ]]; then
            wait_for_log master "Starting Spark master at $URL" "$class"
            wait_for_log master "I have been elected leader" "$class"
        fi
    done < <(daemons)
    for name in "${started[@]}"; do
        [[ $name == master ]] && continue
        wait_for_log "$name" "Successfully registered with master" org.apache.spark.deploy.worker.Worker
    done
    echo "cluster up: $URL ($WORKERS workers x $CORES core(s), $MEMORY each; logs in $DIR/logs)"
}

stop() {
    local name class pid
    # workers first (each stops its executors), then the master
    while read -r name class; do
        pid=$(live_pid "$name" "$class")
        if [[ -n "$pid" ]]; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 30); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.5
            done
            if kill -0 "$pid" 2>/dev/null; then
                echo "$name (pid $pid) ignored SIGTERM for 15 s: SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
            fi
            echo "stopped $name (pid $pid)"
        fi
        rm -f "$DIR/$name.pid"
    done < <(daemons | tac)
}

status() {
    local name class pid ok=0
    while read -r name class; do
        pid=$(live_pid "$name" "$class")
        if [[ -n "$pid" ]]; then
            echo "$name running (pid $pid)"
        else
            echo "$name not running"
            ok=3
        fi
    done < <(daemons)
    echo "master URL: $URL"
    return $ok
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    url) echo "$URL" ;;
    *) echo "usage: $0 start|stop|status|url" >&2; exit 2 ;;
esac

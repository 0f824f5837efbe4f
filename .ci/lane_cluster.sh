#!/usr/bin/env bash
# The cluster lane: a Spark standalone cluster on this machine (scripts/spark_cluster.sh:
# a master and two 1-core workers on 127.0.0.1), the tests marked `cluster` against it,
# and the cluster stopped whatever happened (trap on EXIT, also on INT/TERM).
#
#   .ci/lane_cluster.sh                  # start the cluster, pytest -m cluster, stop it
#   .ci/lane_cluster.sh -- PYTEST_ARGS   # these pytest arguments instead of `-m cluster -ra`
#
# DTT_REQUIRE_CLUSTER=1: a cluster test that cannot find the cluster fails, not skips.
# DTT_REQUIRE_HOROVOD=1: the Horovod run fails, not skips, without Horovod (`make horovod`).
# The master port is DTT_SPARK_MASTER_PORT (default 7077); logs stay in .cluster/logs and
# each executor's stdout/stderr in .cluster/worker-<i>/work/<app>/<executor>/ after the lane.
# Exit status: pytest's (a cluster that does not start is a failure too).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
args=(-m cluster -ra)
if [[ "${1:-}" == "--" ]]; then
    shift
    args=("$@")
fi

# the environment of the main lane (.ci/run builds it first); built here only when missing
[[ -x "$PY" ]] || make venv || exit 1
"$PY" -c "import horovod.torch, horovod.spark" 2>/dev/null || make horovod || exit 1

cleanup() { scripts/spark_cluster.sh stop || true; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

started=$(date +%s)
scripts/spark_cluster.sh start || { echo "lane_cluster: the cluster did not start (logs: .cluster/logs)" >&2; exit 1; }
export DTT_SPARK_MASTER="$(scripts/spark_cluster.sh url)"
export DTT_REQUIRE_CLUSTER=1 DTT_REQUIRE_HOROVOD=1
export PYSPARK_PYTHON="$PWD/$PY" PYSPARK_DRIVER_PYTHON="$PWD/$PY"
"$PY" -m pytest "${args[@]}"
status=$?
echo "lane_cluster: pytest exit $status after $(( $(date +%s) - started )) s"
exit $status

#!/usr/bin/env bash
# The Petastorm lane: a second environment where train.loader=petastorm works, and its tests.
#
# Petastorm 0.13.1 needs pyarrow < 15 (it imports pyarrow.filesystem and the legacy
# ParquetDataset), which pyspark 4 refuses, so this lane has its own virtualenv,
# .venv-petastorm, with setup.py's `petastorm` extra (pyspark 3.5, pyarrow 14.0.2, numpy
# 1.26.4, pandas 2.2.3, like Databricks Runtime 15.4 LTS ML). The pins live in setup.py
# only; this script hashes them (BASE, PETASTORM, TEST and the Python version) and reuses
# the venv while the hash is unchanged, so a rerun skips pip. The project is installed
# editable: source edits need no reinstall.
#
#   .ci/lane_petastorm.sh                  # build or reuse the venv, run the lane's tests
#   .ci/lane_petastorm.sh --setup-only     # build or reuse the venv only
#   .ci/lane_petastorm.sh -- PYTEST_ARGS   # run these pytest arguments instead
#
# Exit status: pytest's (0 only if every selected test passed; a skip of a petastorm test
# is a failure here, since DTT_REQUIRE_PETASTORM=1).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${PETASTORM_VENV:-.venv-petastorm}"
PY="$VENV/bin/python"
STAMP="$VENV/.lane-pins"
PYTHON="${PYTHON:-python3}"

setup_only=0
custom=()
while (($#)); do
    case "$1" in
        --setup-only) setup_only=1; shift ;;
        --) shift; custom=("$@"); break ;;
        *) echo "lane_petastorm.sh: unknown argument '$1' (use --setup-only, or -- PYTEST_ARGS)" >&2; exit 2 ;;
    esac
done

# The pins that decide what is installed, read from setup.py without running it.
pins() {
    "$PYTHON" - <<'EOF'
import ast, hashlib, json, sys
tree = ast.parse(open("setup.py").read())
names = ("BASE", "PETASTORM", "PETASTORM_NO_DEPS", "TEST")
lists = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
         for t in node.targets if isinstance(t, ast.Name) and t.id in names}
missing = set(names) - set(lists)
if missing:
    sys.exit(f"setup.py has no list {sorted(missing)}: the lane installs .[petastorm,test] and PETASTORM_NO_DEPS")
print(hashlib.sha256(json.dumps([lists, sys.version_info[:2]], sort_keys=True).encode()).hexdigest())
print(" ".join(lists["PETASTORM_NO_DEPS"]))
EOF
}

started=$(date +%s)
mapfile -t pinned < <(pins)
((${#pinned[@]} == 2)) || exit 2
want="${pinned[0]}"
read -r -a no_deps <<< "${pinned[1]}"
if [[ -x "$PY" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && "$PY" -c "import petastorm, pyspark, torch" 2>/dev/null; then
    echo "lane: reusing $VENV (pins unchanged)"
else
    echo "lane: building $VENV (pins changed or no usable venv)"
    # from scratch: no package of an older pin set lingers (pip's cache keeps this quick)
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q -e '.[petastorm,test]'
    "$PY" -m pip install -q --no-deps "${no_deps[@]}"
    # the one conflict accepted on purpose (see PETASTORM_NO_DEPS in setup.py); any other fails
    if ! conflicts="$("$PY" -m pip check 2>&1)"; then
        other="$(grep -v '^petastorm .* has requirement setuptools<70' <<< "$conflicts" || true)"
        if [[ -n "$other" ]]; then
            echo "$other" >&2
            exit 1
        fi
    fi
    echo "$want" > "$STAMP"
fi
"$PY" - <<'EOF'
import numpy, pandas, petastorm, pyarrow, pyspark, torch
print(f"lane: pyspark {pyspark.__version__}, pyarrow {pyarrow.__version__}, numpy {numpy.__version__}, "
      f"pandas {pandas.__version__}, petastorm {petastorm.__version__}, torch {torch.__version__}")
EOF
echo "lane: environment ready in $(( $(date +%s) - started )) s"
((setup_only)) && exit 0

export PYSPARK_PYTHON="$PWD/$PY" PYSPARK_DRIVER_PYTHON="$PWD/$PY"
export DTT_REQUIRE_PETASTORM=1
# petastorm's file system wrapper warns about pyarrow.localfs when it is collected at exit,
# after pytest's summary line; the summary should stay the last thing printed
export PYTHONWARNINGS="ignore::FutureWarning:petastorm.fs_utils"
if ((${#custom[@]})); then
    exec "$PY" -m pytest "${custom[@]}"
fi
# The loader and training tests this lane exists for: the Arrow loader (pyarrow 14), the
# Petastorm loader and its end-to-end training (local and torch_distributor), the model
# tests that train in-process, and the delta-rs writes that ETL uses (pyspark 3.5). Left
# out: one read-back through delta-rs's to_pyarrow_table on a partitioned table, which
# needs pyarrow >= 21 (deltalake's own [pyarrow] extra; pyarrow 14 has no pa.field from
# an Arrow C schema); training lists files with delta-rs and never reads that way.
exec "$PY" -m pytest -ra -p no:warnings \
    tests/test_loader.py \
    tests/test_petastorm.py \
    tests/test_models.py \
    tests/test_delta_io.py \
    --deselect tests/test_delta_io.py::test_partitioned_write_restores_partition_columns

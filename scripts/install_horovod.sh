#!/usr/bin/env bash
# Build (once) and install Horovod for train.backend=horovod.
#
#   scripts/install_horovod.sh [PYTHON]        # default: .venv/bin/python of this checkout
#
# Horovod's last release (the version pinned in setup.py's `horovod` extra) does not build
# against torch >= 2.1 as released: its CMake files hard-code C++14 and torch's headers
# need C++17. This script takes the sdist from PyPI, switches both CMake files to C++17,
# builds a wheel with PyTorch + Gloo (no MPI, TensorFlow or MXNet) and caches it in
#   ${DTT_WHEEL_CACHE:-$HOME/.cache/distill-two-tower/wheels}/<key>/
# where <key> changes with the Horovod, torch and Python versions, HOROVOD_GPU_OPERATIONS
# and this script.
# GPU collectives: Horovod builds NCCL operations only when HOROVOD_GPU_OPERATIONS=NCCL is
# set at build time. This script sets it when torch is a CUDA build and nvcc is on PATH
# (a GPU node with the CUDA toolkit); set HOROVOD_GPU_OPERATIONS yourself to override.
# A cached wheel is installed without rebuilding (a build takes ~2.5 min on 2 cores).
#
# Horovod's own [spark] extra is never installed: it pins pyarrow<11 (pyspark 4 refuses
# it) and pulls petastorm. The project's `horovod` extra lists what horovod.spark.run
# needs at runtime instead; pyspark, pyarrow and numpy come with the project itself.
#
# Environment: DTT_WHEEL_CACHE (cache root), DTT_BUILD_JOBS (parallel compile jobs,
# default: the number of cores), DTT_REBUILD_HOROVOD=1 (ignore the cached wheel).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$ROOT/scripts/$(basename "${BASH_SOURCE[0]}")"
PYTHON="${1:-$ROOT/.venv/bin/python}"
CACHE_ROOT="${DTT_WHEEL_CACHE:-$HOME/.cache/distill-two-tower/wheels}"

die() { echo "install_horovod: $*" >&2; exit 1; }
say() { echo "install_horovod: $*" >&2; }

[ -x "$PYTHON" ] || die "no Python interpreter at '$PYTHON' (make venv first, or pass one)"
PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"
PIP=("$PYTHON" -m pip)

# the one pin: setup.py's `horovod` extra, read by running setup.py with setup() captured
# (one requirement per line; the horovod==X line gives the version)
mapfile -t EXTRA < <("$PYTHON" - "$ROOT" <<'EOF'
import os, sys
import setuptools
captured = {}
setuptools.setup = lambda **kw: captured.update(kw)
os.chdir(sys.argv[1])
exec(compile(open("setup.py").read(), "setup.py", "exec"), {"__name__": "__main__", "__file__": "setup.py"})
print("\n".join(captured.get("extras_require", {}).get("horovod", [])))
EOF
)
HVD_VERSION=""
for req in "${EXTRA[@]}"; do
    if [[ "$req" =~ ^horovod==([0-9][0-9A-Za-z.+-]*)$ ]]; then HVD_VERSION="${BASH_REMATCH[1]}"; fi
done
[ -n "$HVD_VERSION" ] || die "setup.py's 'horovod' extra must pin it exactly (\"horovod==X.Y.Z\"); it lists: ${EXTRA[*]:-nothing}"

TORCH_VERSION="$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null)" \
    || die "torch is not importable by $PYTHON: install the project first (pip install -e '.[local]')"
PY_TAG="$("$PYTHON" -c 'import sys, sysconfig; print(f"{sys.implementation.name}{sys.version_info[0]}{sys.version_info[1]}-{sysconfig.get_platform()}")')"
KEY_HASH="$( { echo "$HVD_VERSION $TORCH_VERSION $PY_TAG ${HOROVOD_GPU_OPERATIONS:-auto}"; cat "$SCRIPT"; } | sha256sum | cut -c1-12)"
KEY="horovod-${HVD_VERSION}-torch-${TORCH_VERSION}-${PY_TAG}-${KEY_HASH}"
WHEEL_DIR="$CACHE_ROOT/$KEY"

find_wheel() { [ -d "$WHEEL_DIR" ] && find "$WHEEL_DIR" -maxdepth 1 -name "horovod-${HVD_VERSION}-*.whl" | head -n 1 || true; }

WHEEL="$(find_wheel)"
if [ -n "$WHEEL" ] && [ "${DTT_REBUILD_HOROVOD:-0}" != 1 ]; then
    say "cached wheel $WHEEL"
else
    say "building horovod $HVD_VERSION for torch $TORCH_VERSION ($PY_TAG); cache key $KEY"
    started=$SECONDS
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/horovod-build.XXXXXX")"
    trap 'rm -rf "$WORK"' EXIT

    # build tools and horovod's setup_requires (its install_requires; setuptools would
    # otherwise try to fetch them itself during the build)
    missing=()
    for mod_pkg in setuptools:setuptools wheel:wheel cloudpickle:cloudpickle psutil:psutil \
                   yaml:pyyaml packaging:packaging cffi:cffi; do
        "$PYTHON" -c "import ${mod_pkg%%:*}" 2>/dev/null || missing+=("${mod_pkg#*:}")
    done
    command -v cmake >/dev/null 2>&1 || missing+=("cmake>=3.13")
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing build requirements from PyPI: ${missing[*]}"
        "${PIP[@]}" install -q "${missing[@]}"
    fi
    CMAKE_BIN="$(command -v cmake || echo "$(dirname "$PYTHON")/cmake")"
    [ -x "$CMAKE_BIN" ] || die "cmake is neither on PATH nor installed next to $PYTHON"
    command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 || die "no C++ compiler (g++) on PATH"

    "${PIP[@]}" download -q --no-deps --no-binary :all: "horovod==$HVD_VERSION" -d "$WORK/sdist" \
        || die "cannot download the horovod $HVD_VERSION sdist from PyPI"
    tar -xzf "$WORK"/sdist/horovod-"$HVD_VERSION".tar.gz -C "$WORK"
    SRC="$WORK/horovod-$HVD_VERSION"
    for f in CMakeLists.txt horovod/torch/CMakeLists.txt; do
        grep -q 'set(CMAKE_CXX_STANDARD 14)' "$SRC/$f" \
            || die "$f of horovod $HVD_VERSION has no 'set(CMAKE_CXX_STANDARD 14)': this patch is for 0.28.1, review it"
        sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$SRC/$f"
    done

    # NCCL for GPU tensors where this torch and a CUDA toolkit can build it (see above)
    if [ -z "${HOROVOD_GPU_OPERATIONS:-}" ] && command -v nvcc >/dev/null 2>&1 \
        && "$PYTHON" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
        export HOROVOD_GPU_OPERATIONS=NCCL
    fi
    say "GPU operations: ${HOROVOD_GPU_OPERATIONS:-none (CPU build: Gloo only)}"

    # MAKEFLAGS also stops horovod's setup.py from adding its own -j8
    (cd "$SRC" && PATH="$(dirname "$CMAKE_BIN"):$PATH" \
        MAKEFLAGS="-j${DTT_BUILD_JOBS:-$(nproc)}" \
        CMAKE_POLICY_VERSION_MINIMUM=3.5 \
        HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
        HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
        "${PIP[@]}" wheel --no-deps --no-build-isolation -w "$WORK/wheel" .) \
        || die "building the horovod wheel failed (see the compiler output above)"
    built="$(find "$WORK/wheel" -maxdepth 1 -name 'horovod-*.whl' | head -n 1)"
    [ -n "$built" ] || die "pip wheel produced no horovod wheel"

    # publish atomically: a concurrent run sees no folder or a complete one
    mkdir -p "$CACHE_ROOT"
    staging="$(mktemp -d "$CACHE_ROOT/.staging.XXXXXX")"
    cp "$built" "$staging/"
    rm -rf "$WHEEL_DIR"
    mv "$staging" "$WHEEL_DIR" 2>/dev/null || rm -rf "$staging"   # another run won the race
    WHEEL="$(find_wheel)"
    [ -n "$WHEEL" ] || die "no wheel in $WHEEL_DIR after the build"
    say "built $WHEEL in $((SECONDS - started)) s"
fi

# this wheel, even where another horovod build of the same version is installed (pip
# would call that one satisfied); then the rest of the project's `horovod` extra
# (horovod.spark's runtime requirements), with the cached wheel preferred over PyPI's sdist
"${PIP[@]}" install -q --no-deps --force-reinstall "$WHEEL"
"${PIP[@]}" install -q --find-links "$WHEEL_DIR" "${EXTRA[@]}"

"$PYTHON" - <<'EOF' || die "horovod was installed but does not work with torch and Spark (see above)"
import horovod, horovod.torch as hvd, horovod.spark  # noqa: F401
assert hvd.gloo_built(), "this horovod build has no Gloo controller"
print(f"install_horovod: horovod {horovod.__version__} ready (gloo={hvd.gloo_built()}, "
      f"nccl={hvd.nccl_built()}, mpi={hvd.mpi_built()})")
EOF

# Quickstart: `make run` (the PFD pipeline on the embedded default), `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))
PYTEST_ARGS ?=

.PHONY: venv run test test-fast bench clean horovod test-petastorm

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

SUBMIT := $(VENV)/bin/spark-submit --master 'local[2]' --driver-memory 4g \
	--driver-java-options '-Dlog4j2.configurationFile=$(abspath conf/log4j2.properties)'

# Delta's jars of the installed delta-spark (etl/spark.py's delta_package, as Delta's
# configure_spark_with_delta_pip names them): Ivy fetches them from Maven Central once
# (~/.ivy2.5.2), and the job's session gets Delta's extension and catalog
DELTA_PACKAGES = $(shell $(PY) -c 'from etl.spark import delta_package; print(delta_package())')

run: venv
	$(SUBMIT) --packages $(DELTA_PACKAGES) jobs/distill_pfd.py $(ARGS)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The petastorm lane: .venv-petastorm (setup.py's petastorm extra: pyspark 3.5, pyarrow
# 14.0.2), reused while its pins are unchanged, then the loader and training tests there
test-petastorm:
	bash .ci/lane_petastorm.sh

# Horovod for train.backend=horovod: a patched wheel, built once and cached
horovod: venv
	scripts/install_horovod.sh $(PY)

# loader rows/s and training samples/s per backend (figures in docs/results.md)
bench: venv
	$(PY) benchmarks/bench_loader.py
	$(PY) benchmarks/bench_training.py --threads 1

clean:
	rm -rf warehouse runs spark-warehouse

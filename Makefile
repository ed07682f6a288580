# make train: build the venv if needed, then train the tiny NVLM-D job on synthetic data (CPU).
# make test:  build the venv if needed, then run the whole test suite.
PY := .venv/bin/python
export OMP_NUM_THREADS := 1
DATA ?= data-synth
RUN ?= runs/tiny-d

.PHONY: venv train test eval clean shellcheck
venv:
	@tools/venv.sh

# tests/test_slurm.py runs shellcheck on the rendered sbatch scripts and fails without it.
shellcheck:
	@command -v shellcheck >/dev/null || apt-get install -y shellcheck >/dev/null 2>&1 \
	  || (apt-get update >/dev/null 2>&1 && apt-get install -y shellcheck >/dev/null 2>&1) \
	  || { echo "shellcheck is missing and apt-get could not install it" >&2; exit 1; }

train: venv
	@test -f $(DATA)/.complete || $(PY) -m mmpretrain data synth --out $(DATA)
	$(PY) -m mmpretrain train jobs/tiny-d.yaml --run-dir $(RUN) --set data.path=$(DATA)
	$(PY) -m mmpretrain eval --run $(RUN)

test: venv shellcheck
	$(PY) -m pytest -q --durations=15 tests

clean:
	rm -rf runs data-synth

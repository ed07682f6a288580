# make train: build the venv if needed, then train the tiny NVLM-D job on synthetic data (CPU).
# make test:  build the venv if needed, then run the whole test suite.
PY := .venv/bin/python
export OMP_NUM_THREADS := 1
DATA ?= data-synth
RUN ?= runs/tiny-d

.PHONY: venv train test eval clean
venv:
	@tools/venv.sh

train: venv
	@test -f $(DATA)/.complete || $(PY) -m mmpretrain data synth --out $(DATA)
	$(PY) -m mmpretrain train jobs/tiny-d.yaml --run-dir $(RUN) --set data.path=$(DATA)
	$(PY) -m mmpretrain eval --run $(RUN)

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf runs data-synth

# The README's two commands: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo demo-speech lint smoke-train clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first: the pinned CPU wheel on disk. A bare `torch` would pull a CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(VENV)/bin/avatarforcing generate --model mini --identity demo \
	    --audio avatarforcing/assets/demo/utterance.wav --out out/demo.mp4

demo-speech: $(STAMP)
	$(VENV)/bin/avatarforcing generate --model mini --identity demo \
	    --audio avatarforcing/assets/demo/speech.mp3 --out out/demo_speech.mp4

# every training stage on a tiny corpus, a few steps each (a few minutes on CPU); the student then streams
smoke-train: $(STAMP)
	$(VENV)/bin/avatarforcing data synth --out out/smoke/corpus --clips 2 --seconds 4 --split train --seed 1
	$(VENV)/bin/avatarforcing data synth --out out/smoke/corpus --clips 1 --seconds 4 --split heldout --seed 1
	$(VENV)/bin/avatarforcing train recipe --smoke --corpus out/smoke/corpus --out out/smoke/run --export out/smoke/model
	$(VENV)/bin/avatarforcing generate --model out/smoke/model --identity demo \
	    --audio out/smoke/corpus/clips/heldout-00000/audio.wav --out out/smoke/student.mp4

lint: $(STAMP)
	$(VENV)/bin/ruff check avatarforcing tests

clean:
	rm -rf $(VENV) out .pytest_cache

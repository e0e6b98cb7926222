# Two entry points for a fresh machine (see README): `make run` and `make test`.
# Both create .venv in the repo root on first use and reuse it afterwards.
PY := .venv/bin/python
PIP := .venv/bin/pip

.venv/.installed: requirements.txt
	python3 -m venv .venv
	$(PIP) install --upgrade pip >/dev/null
	$(PIP) install -r requirements.txt
	# pillow-simd (faster JPEG decode) goes last: a later resolve of torchvision would put
	# Pillow back. Where it cannot build, plain Pillow stays and everything still works.
	$(PIP) install --force-reinstall --no-deps pillow-simd || echo "pillow-simd not installed; using Pillow"
	touch $@

.venv/.test-installed: .venv/.installed requirements-captions.txt requirements-tracking.txt
	$(PIP) install pytest scikit-learn ruff hypothesis
	# The captioning extra (transformers, ~150 MB installed, no torch of its own): tests/test_captioner.py.
	$(PIP) install -r requirements-captions.txt
	# The tracking extra (the mlflow client with SQLAlchemy and Alembic for its SQLite store, ~65 MB, no server).
	$(PIP) install -r requirements-tracking.txt
	# The full mlflow of the extra's version in a venv of its own (~100 MB download, 850 MB, ~1 min): the server
	# tests/test_tracking.py logs to; the trainer's venv keeps only the extra, so the tests prove the extra enough.
	python3 -m venv .venv/mlflow-server
	.venv/mlflow-server/bin/pip install "mlflow==$$(sed -n 's/^mlflow-skinny==//p' requirements-tracking.txt)"
	touch $@

.PHONY: setup run test gpu-wheels
setup: .venv/.installed

run: .venv/.installed
	@test -f train.py || { echo "make run: the trainer (train.py) is not implemented yet; see README, Status"; exit 2; }
	$(PY) train.py

# The linter first (settings in pyproject.toml): a lint error fails the run before the tests start.
test: .venv/.test-installed
	$(PY) -m ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests

# The wheels bench/gpu_check.py installs on the GPU image (Python 3.12, no open_clip, ftfy or
# pytest there, and no package index): exactly the list in bench/gpu-wheels.txt, no dependencies
# (torch, torchvision and triton are the image's own). wheels/ is git-ignored; the GPU machine gets
# it by carrying wheels/py312 with the working tree.
GPU_WHEELS := wheels/py312
gpu-wheels: $(GPU_WHEELS)/.complete

$(GPU_WHEELS)/.complete: bench/gpu-wheels.txt
	rm -rf $(GPU_WHEELS)
	python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(GPU_WHEELS) -r bench/gpu-wheels.txt
	touch $@

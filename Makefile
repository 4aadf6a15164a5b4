.PHONY: install test lint format bench demo docs-figures

install:
	pip install torch==2.13.0 && pip install -e ".[dev]"

test:
	python -m pytest -q

lint:
	ruff check . && ruff format --check .

format:
	ruff format . && ruff check --fix .

bench:
	python benchmarks/run.py

demo:
	python recipes/grpo_forking.py

# Every figure of README.md and docs/ from scratch (about an hour on 2 cores): docs/figures.py.
docs-figures:
	python docs/figures.py

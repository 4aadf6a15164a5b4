.PHONY: install test lint format bench demo

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

# The README's two commands: `make demo` (try it) and `make test` (test it). Both first run setup_env.sh,
# which is idempotent (seconds when nothing changed). Knobs are environment variables: ENV_PATH,
# ENV_BACKEND, TORCH_SPEC, ... (setup_env.sh), DATA_DIR, RUNS_DIR (activate_env.sh), and PYTEST_ARGS and
# DEMO_ARGS here (e.g. make demo DEMO_ARGS='--seeds 4', or '--on slurm --gpu-type h100').
SHELL := /bin/bash
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup demo test

setup:
	bash setup_env.sh

demo: setup
	. ./activate_env.sh && python -m slurm.demo $(DEMO_ARGS)

# Every tier this machine can run: unit and CPU integration always; the local Slurm cluster where root
# can install Debian's Slurm (else skipped, with the reason in the summary); GPU tests where CUDA works.
test: setup
	. ./activate_env.sh && python -m pytest $(PYTEST_ARGS)

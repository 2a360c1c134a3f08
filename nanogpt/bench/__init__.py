"""Measurements of the baseline trainer, apart from its tests.

    python -m nanogpt.bench [recipe] [--key=value ...]   # throughput: ms/step, tokens/s, MFU (throughput.py)
    bash nanogpt/bench/gpu_session.sh                    # on a GPU machine: the GPU tests, then a throughput sweep
"""

"""`python -m nanogpt.bench`: the baseline trainer's throughput (see nanogpt/bench/throughput.py)."""

import sys

from nanogpt.bench.throughput import cli

if __name__ == "__main__":
    sys.exit(cli())

"""Which Triton kernels took longest to compile: read a Triton cache directory filled by one run.

    TRITON_CACHE_DIR=/tmp/tc python -m modded_nanogpt.bench.profile --stage=0 --steps=2 --no_profile
    python -m modded_nanogpt.bench.compile_times /tmp/tc [--since=UNIX_TIME]

Inductor submits a graph's kernels to its compile workers as it generates them, within seconds of each
other, so a kernel whose files land long after the others is a slow compile. Prints the kernels in bursts
(files less than a second apart) with the seconds from --since (or the first file). This found the sort
kernels of the block masks: they landed 40-120 s after the rest of the first graph's kernels.
"""

import argparse
import os
import sys


def kernels(cache_dir):
    """(name, finish time, directory) for every compiled kernel in the cache."""
    found = []
    for entry in os.scandir(cache_dir):
        if not entry.is_dir():
            continue
        names = [f for f in os.listdir(entry.path) if f.endswith(".cubin")]
        if not names:
            continue
        path = os.path.join(entry.path, names[0])
        found.append((names[0][: -len(".cubin")], os.path.getmtime(path), entry.path))
    return found


def main(argv):
    p = argparse.ArgumentParser(prog="python -m modded_nanogpt.bench.compile_times",
                                description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("cache_dir", help="the TRITON_CACHE_DIR of one run")
    p.add_argument("--since", type=float, default=None, help="UNIX time to count from (default: the first file)")
    args = p.parse_args(argv)
    cache_dir = args.cache_dir
    if not os.path.isdir(cache_dir):
        p.error(f"cache_dir: not a directory: {cache_dir}")
    found = kernels(cache_dir)
    if not found:
        raise SystemExit(f"no compiled kernels (.cubin files) under {cache_dir}")
    start = args.since if args.since is not None else min(t for _, t, _ in found)
    found.sort(key=lambda k: k[1])
    print(f"{len(found)} kernels in {cache_dir}; seconds from start to their files, in bursts (kernels <1 s apart)")
    burst = [found[0]]
    for kernel in found[1:] + [None]:
        if kernel is not None and kernel[1] - burst[-1][1] < 1.0:
            burst.append(kernel)
            continue
        names = sorted({name[:60] for name, _, _ in burst})
        print(f"{burst[0][1] - start:7.1f}-{burst[-1][1] - start:7.1f} s  {len(burst):3d} kernels: {', '.join(names[:4])}"
              + (f" (+{len(names) - 4} more names)" if len(names) > 4 else ""))
        burst = [kernel]


if __name__ == "__main__":
    main(sys.argv[1:])

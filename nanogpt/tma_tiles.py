"""The tile walk of a persistent TMA matmul a (M, K) @ b (N, K)^T, as Triton functions the kernels call (Triton
inlines them: the kernels compile to the same code as with the walk written in them):

    tile_offsets(tile, tiles_m, programs_per_group, BLOCK_M, BLOCK_N, GROUP_M) -> (off_m, off_n)
        the first row and column of output tile number `tile`, tiles numbered in groups of GROUP_M row-tiles
        that sweep the columns together, so the b tiles they share come from L2 rather than HBM;
    tile_matmul(a_desc, b_desc, off_m, off_n, k_tiles, BLOCK_M, BLOCK_N, BLOCK_K) -> acc
        that tile's a @ b^T in float32, k_tiles loads of BLOCK_K columns through the TMA descriptors.

A persistent kernel runs a program per SM (or a few), each taking tiles program_id, + NUM_SMS, ... below
tiles_m * tiles_n. It computes tiles_m = cdiv(M, BLOCK_M), programs_per_group = GROUP_M * cdiv(N, BLOCK_N) and
k_tiles = cdiv(K, BLOCK_K) once, before that loop, and passes them in (computed in here, they would be
computed again for every tile).

nanogpt/tma_tiles.py and modded_nanogpt/kernels/tma_tiles.py are byte-identical copies, so that each trainer's
folder stands alone; tests/test_tma_tiles.py fails when they differ.
"""

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines: the kernels that call these are not defined either
    triton = tl = None

if triton is not None:

    @triton.jit
    def tile_offsets(tile, tiles_m, programs_per_group, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     GROUP_M: tl.constexpr):
        """(off_m, off_n) of output tile `tile`: tiles_m row-tiles, GROUP_M of them in a group."""
        first_tile_m = (tile // programs_per_group) * GROUP_M
        group_rows = tl.minimum(tiles_m - first_tile_m, GROUP_M)
        off_m = (first_tile_m + (tile % programs_per_group) % group_rows) * BLOCK_M
        off_n = ((tile % programs_per_group) // group_rows) * BLOCK_N
        return off_m, off_n

    @triton.jit
    def tile_matmul(a_desc, b_desc, off_m, off_n, k_tiles, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
        """a[off_m:off_m + BLOCK_M] @ b[off_n:off_n + BLOCK_N]^T in float32, over k_tiles * BLOCK_K columns."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            k = ki * BLOCK_K
            acc = tl.dot(a_desc.load([off_m, k]), b_desc.load([off_n, k]).T, acc)
        return acc

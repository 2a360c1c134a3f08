"""The tile walk of the persistent TMA matmuls (which output tile a program takes, and the K loop that
accumulates it) is one contract kept as byte-identical copies, one in each trainer so either folder stands alone:
nanogpt/tma_tiles.py (the baseline's GELU MLP kernel) and modded_nanogpt/kernels/tma_tiles.py (the speedrun's
squared-ReLU MLP kernel). These tests fail when the copies differ, and when a trainer's kernel takes the walk from
anywhere but its own copy or writes it out again. That the walk computes the right product is the kernels' GPU
tests (tests/test_fused_mlp.py, tests/test_modded_kernels.py); the helpers exist only where triton imports.
"""

import ast
import difflib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
COPIES = {"nanogpt.tma_tiles": "nanogpt/tma_tiles.py",
          "modded_nanogpt.kernels.tma_tiles": "modded_nanogpt/kernels/tma_tiles.py"}
# each kernel module, the copy it must import, and its persistent TMA kernel
KERNELS = [("nanogpt/fused_mlp.py", "nanogpt.tma_tiles", "_gelu_tma_persistent_kernel"),
           ("modded_nanogpt/kernels/mlp.py", "modded_nanogpt.kernels.tma_tiles", "_relu2_tma_persistent_kernel")]
HELPERS = {"tile_offsets", "tile_matmul"}


def test_the_two_copies_are_byte_identical():
    (first, first_path), (second, second_path) = [((REPO_ROOT / p).read_text(), p) for p in COPIES.values()]
    diff = "".join(difflib.unified_diff(first.splitlines(True), second.splitlines(True), first_path, second_path))
    assert first == second, f"the copies of the TMA tile walk differ; make them one again:\n{diff}"


def test_each_copy_defines_the_helpers_as_triton_functions():
    tree = ast.parse((REPO_ROOT / COPIES["nanogpt.tma_tiles"]).read_text())
    jitted = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
              and any(ast.unparse(d) == "triton.jit" for d in node.decorator_list)}
    assert jitted == HELPERS


def test_each_kernel_walks_its_tiles_through_its_own_copy():
    for path, own_copy, kernel_name in KERNELS:
        tree = ast.parse((REPO_ROOT / path).read_text())
        imported = {node.module: {alias.name for alias in node.names} for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom)}
        assert imported.get(own_copy) == HELPERS, f"{path} must import {sorted(HELPERS)} from {own_copy}"
        others = set(COPIES) - {own_copy}
        assert not others & set(imported), f"{path} imports the other trainer's copy ({others & set(imported)})"
        kernel = next(node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef) and node.name == kernel_name)
        called = {node.func.id for node in ast.walk(kernel) if isinstance(node, ast.Call)
                  and isinstance(node.func, ast.Name)}
        assert HELPERS <= called, f"{path}: {kernel_name} does not call {sorted(HELPERS - called)}"
        # the walk is not written out a second time beside the call
        dots = [node for node in ast.walk(kernel) if isinstance(node, ast.Attribute) and node.attr == "dot"]
        assert not dots, f"{path}: {kernel_name} has its own tl.dot loop besides tile_matmul"

"""Bytes moved and launches per op and pass, counted through Triton's interpreter.

Speed on a GPU is bytes over bandwidth for these memory-bound kernels: every byte a
kernel loads or stores beyond what the op must move is time lost. This runs each op's
kernels in Triton's interpreter (TRITON_INTERPRET=1) with the interpreter's load and store
counted: each masked-in lane of a ``tl.load`` / ``tl.store`` adds its element's bytes
(``lanes``), and the DRAM traffic of each launch whose re-accesses hit in cache is
counted too (``moved``: each element read from memory once if its first access is a
load, written back once if it is stored; a second read of a block just read, or a read
of what the launch itself wrote, is a cache hit; an in-place update is a read and a
write). Both against the floor: each input read once, each output written once (each
case's docstring states its floor). Deterministic: a CI budget.

    TRITON_INTERPRET=1 python -m rlhf_fast.benchmarks.traffic   # the table the README
                                                               # quotes (`markdown`)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rlhf_fast.benchmarks.report import markdown_table
from rlhf_fast.benchmarks.traffic_cases import CASES


@dataclass
class Traffic:
    """Bytes loaded and stored and launches, counted while `counting()` is active:
    `lanes` every access, `moved` the distinct bytes of each launch, summed."""

    lanes: int = 0
    moved: int = 0
    launches: list[str] = field(default_factory=list)
    moved_by_kernel: dict[str, int] = field(default_factory=dict)
    lanes_by_kernel: dict[str, int] = field(default_factory=dict)
    touched: list[Any] = field(default_factory=list)  # this launch's (addresses, size, store)


def _launch_traffic(touched: list[tuple[Any, int, bool]]) -> int:
    """DRAM bytes of one launch from its accesses in order: an element is read once if
    its first access is a load, written once if it is ever stored."""
    import numpy as np

    moved = 0
    for itemsize in {size for _, size, _ in touched}:
        accesses = [(a, s) for a, size, s in touched if size == itemsize]
        addresses = np.concatenate([a for a, _ in accesses])
        stores = np.concatenate([np.full(len(a), s) for a, s in accesses])
        unique, first = np.unique(addresses, return_index=True)
        read = np.count_nonzero(~stores[first])
        written = len(np.unique(addresses[stores]))
        moved += (read + written) * itemsize
    return moved


@contextlib.contextmanager
def counting() -> Iterator[Traffic]:
    """Within the block, count the bytes every interpreted kernel loads and stores and
    the launches (kernel names, in order)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("traffic counts through Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before triton is imported")
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    traffic = Traffic()
    load, store = builder.create_masked_load, builder.create_masked_store

    def touch(ptrs, mask, itemsize, is_store):
        lanes = np.broadcast_to(mask.data, ptrs.data.shape)
        count = int(np.count_nonzero(lanes)) * itemsize
        traffic.lanes += count
        kernel = traffic.launches[-1]
        traffic.lanes_by_kernel[kernel] = traffic.lanes_by_kernel.get(kernel, 0) + count
        traffic.touched.append((ptrs.data[lanes].ravel(), itemsize, is_store))

    def counted_load(self, ptrs, mask, other, *args, **kwargs):
        out = load(self, ptrs, mask, other, *args, **kwargs)
        touch(ptrs, mask, out.data.dtype.itemsize, False)
        return out

    def counted_store(self, ptrs, value, mask, *args, **kwargs):
        touch(ptrs, mask, value.data.dtype.itemsize, True)
        return store(self, ptrs, value, mask, *args, **kwargs)

    def launched(kernel: str, launch: Callable[[], Any]) -> Any:
        traffic.launches.append(kernel)
        traffic.touched = []
        try:
            return launch()
        finally:
            moved = _launch_traffic(traffic.touched)
            traffic.moved += moved
            traffic.moved_by_kernel[kernel] = traffic.moved_by_kernel.get(kernel, 0) + moved

    def counted_run(self, *args, **kwargs):
        return launched(self.fn.__name__, lambda: run(self, *args, **kwargs))

    def counted_getitem(self, grid):
        launch = getitem(self, grid)
        return lambda *args, **kwargs: launched(self.fn.__name__,
                                                lambda: launch(*args, **kwargs))

    # kernel[grid](...) calls the class's run (triton >= 3.4); triton 3.3's
    # InterpretedFunction has none: its __getitem__ returns the launcher
    function = interpreter.InterpretedFunction
    run, getitem = getattr(function, "run", None), function.__getitem__
    launch_hook = ("run", counted_run) if run is not None else ("__getitem__", counted_getitem)
    patched = [(builder, "create_masked_load", counted_load),
               (builder, "create_masked_store", counted_store), (function, *launch_hook)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]
    try:
        for owner, name, value in patched:
            setattr(owner, name, value)
        yield traffic
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def table() -> list[dict[str, Any]]:
    rows = []
    for name, (setup, launches, budget, share) in CASES.items():
        run, floor = setup()
        with counting() as traffic:
            run()
        moved, lanes = traffic.moved, traffic.lanes
        if share is not None:
            moved = sum(traffic.moved_by_kernel.get(kernel, 0) for kernel in share)
            lanes = sum(traffic.lanes_by_kernel.get(kernel, 0) for kernel in share)
        rows.append(dict(case=name, moved=moved, lanes=lanes, floor=floor,
                         ratio=round(moved / floor, 4), lanes_ratio=round(lanes / floor, 4),
                         budget=budget, launches=traffic.launches,
                         expected_launches=list(launches)))
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """`table()`'s rows as the markdown table this tool prints and the README quotes."""
    return markdown_table(
        ["op, pass, shape", "bytes moved (distinct per launch)", "floor",
         "moved / floor (budget)", "every access / floor", "launches"],
        ([row["case"], row["moved"], row["floor"], f"{row['ratio']:.3f}x ({row['budget']}x)",
          f"{row['lanes_ratio']:.3f}x", len(row["launches"])] for row in rows))


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    print(markdown(table()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

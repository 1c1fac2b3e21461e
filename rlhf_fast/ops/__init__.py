"""One module per op: its custom ops (registered with `library.kernel_op`), input checks
and dispatch."""

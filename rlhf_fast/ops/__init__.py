"""One module per op: its autograd.Function, input checks and dispatch."""

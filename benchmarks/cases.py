"""The case scaffold of every suite: its cases, and the life of one (skip, gate, time, row).

A suite declares one `Suite`, ``SUITE``: its op, its sizes, modes and variants, its
providers (a function each, or a `Provider` that builds one: `compiled_eager`, `peer`),
and what is its own: how inputs are made (``make_inputs``), how a provider is checked
against the float64 reference (``gate``) and timed (``timed``), and the row's roofline
columns (``columns``). The benchmarks' conftest makes
``SUITE.cases(quick)`` the ``case`` parameter of the suite's test, which hands each case
to ``SUITE.run_test``:

1. a provider that cannot run here (``torch.compile`` off CUDA, a peer that is missing or
   needs CUDA, a suite's own reason) gives a skipped row;
2. the inputs are made (after the GEMM rate is measured, for a GEMM-bound suite);
3. `gate_and_time`: the provider is gated, then timed, then its row is written; one that
   fails the gate is reported "wrong" and not timed (a pytest failure for rlhf-fast, an
   xfail for a peer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
import torch

from rlhf_fast.benchmarks import peers, timing
from rlhf_fast.benchmarks.inputs import provider_input
from rlhf_fast.benchmarks.report import make_row, status_skipped, status_wrong

Shape = tuple[Any, ...]
#: A provider's function, built by `Suite.provider` (its signature is the suite's).
Fn = Callable[..., Any]
#: The timed call and its untimed per-call setup (None: ``fn()`` needs none).
Timed = tuple[Callable[..., Any], Callable[[], Any] | None]
#: Whether a provider passed the gate, and its relative errors by output name.
GateResult = tuple[bool, dict[str, float]]

#: Short dtype names in case ids.
DTYPE_LABELS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def sizes(shapes: Sequence[Shape], dtype: Any) -> list[tuple[Shape, Any]]:
    """(shape, dtype) pairs of a suite whose inputs have one dtype."""
    return [(shape, dtype) for shape in shapes]


@dataclasses.dataclass(frozen=True)
class Provider:
    """A provider whose function is built per case (``build(case, device)``), e.g. a
    compiled one or a peer's; `entries`: the peer attributes it needs, each importable
    and able to run here, or the case is skipped saying why."""

    build: Callable[[Case, torch.device], Fn]
    entries: tuple[peers.Entry, ...] = ()


def compiled_eager(eager: Fn) -> Provider:
    """The ``compile`` provider: ``torch.compile`` of `eager`, one variant per mode
    (`peers.compiled_for_mode`)."""
    return Provider(lambda case, device: peers.compiled_for_mode(eager, case.mode))


#: The provider every suite with an ``rlhf_fast`` one gets beside it (`Suite`).
COMPILED_RLHF_FAST = "compile-rlhf_fast"


def compiled_provider(provider: Fn | Provider) -> Provider:
    """`provider` (a function, or a `Provider` building one) under ``torch.compile``."""
    if isinstance(provider, Provider):
        return Provider(lambda case, device: peers.compiled_for_mode(
            provider.build(case, device), case.mode), provider.entries)
    return compiled_eager(provider)


def eager_and_compiled(eager: Fn) -> dict[str, Fn | Provider]:
    """The ``eager`` provider and its ``compile`` (`compiled_eager`), in table order."""
    return {"eager": eager, "compile": compiled_eager(eager)}


def peer(adapter: Callable[..., Fn], *entries: peers.Entry, with_device: bool = False
         ) -> Provider:
    """A peer's provider: ``adapter(*the entries' attributes)`` (and the device, with
    `with_device`), built where every entry can run."""

    def build(case: Case, device: torch.device) -> Fn:
        resolved = [entry.require(device) for entry in entries]
        return adapter(*resolved, device) if with_device else adapter(*resolved)

    return Provider(build, entries)


@dataclasses.dataclass(frozen=True)
class Case:
    """One case of `suite`: a size as the suite lists it (`shape`: what its inputs are
    made from), the inputs' `dtype`, the `variant` ("" where the suite has none), the
    mode and the provider."""

    suite: Suite = dataclasses.field(repr=False, compare=False)
    shape: Shape
    dtype: Any
    variant: str
    mode: str
    provider: str

    @property
    def id(self) -> str:
        """The pytest id (``-k`` selects on it): the suite's label, mode, provider."""
        return f"{self.suite.label(self)}-{self.mode}-{self.provider}"


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long a case is timed: ``time_fn``'s warmup and repetition budgets (ms, CUDA)
    and timed calls on the CPU. Each case is timed once, by ``time_fn``: the CLI runs
    pytest-benchmark disabled (its fixture records the rows' extra_info only)."""

    warmup_ms: float = 25
    rep_ms: float = 200
    cpu_repeats: int = 5


def _no_reason(case: Case, device: torch.device) -> str | None:
    return None


def _default_budget(case: Case) -> Budget:
    return Budget()


def _case_shape(case: Case) -> Shape:
    return case.shape


def _nothing(case: Case, inputs: Any) -> dict[str, Any]:
    return {}


def default_label(case: Case) -> str:
    """A case id's size part: the table's shape, the dtype and the variant (if any)."""
    shape = "x".join(map(str, case.suite.table_shape(case)))
    dtype = DTYPE_LABELS.get(case.dtype, str(case.dtype).removeprefix("torch."))
    return f"{shape}-{dtype}" + (f"-{case.variant}" if case.variant else "")


@dataclasses.dataclass(frozen=True, eq=False)
class Suite:
    """What a benchmark suite declares; the scaffold does the rest (module docstring).

    The functions take the case; ``gate`` and ``timed`` also the inputs and the
    provider's function; ``columns`` the inputs, the timing and the rate the roofline is
    taken from (``roofline``: "copy", the copy bandwidth in bytes/s, or "gemm", the bf16
    GEMM rate in FLOP/s, measured before the case's inputs exist).
    """

    #: The op (or workload) name: the rows' ``op``, the result files' name.
    op: str
    #: (shape, dtype) of the GPU run and of quick mode (--quick, or no CUDA GPU).
    sizes: Sequence[tuple[Shape, Any]]
    quick_sizes: Sequence[tuple[Shape, Any]]
    modes: Sequence[str]
    #: The providers' functions (or how each is built), by name, in table order.
    #: ``compile*`` ones are skipped off CUDA; a ``*-inplace`` one has no ``fwd`` case
    #: (in-place changes only the backward). An ``rlhf_fast`` provider gets a
    #: `COMPILED_RLHF_FAST` one beside it.
    providers: Mapping[str, Fn | Provider]
    make_inputs: Callable[[Case, torch.device], Any]
    gate: Callable[[Case, Any, Fn], GateResult]
    timed: Callable[[Case, Any, Fn], Timed]
    columns: Callable[[Case, Any, dict[str, float], float], dict[str, Any]]
    roofline: str = "copy"
    #: What a case computes besides its size, mode and provider (e.g. logp+entropy).
    variants: Sequence[str] = ("",)
    #: A suite's own reason to skip a case (None: it runs).
    skip: Callable[[Case, torch.device], str | None] = _no_reason
    budget: Callable[[Case], Budget] = _default_budget
    #: The table's shape column of a case (e.g. the logits' shape, from the batch's).
    table_shape: Callable[[Case], Shape] = _case_shape
    #: Row columns that depend on the inputs (e.g. the answer tokens).
    describe: Callable[[Case, Any], dict[str, Any]] = _nothing
    #: A case id's size part.
    label: Callable[[Case], str] = default_label
    #: The variants `headline_cases` runs (None: every one), for a suite whose variants
    #: run the same GEMMs and differ only in elementwise work.
    headline_variants: Sequence[str] | None = None

    def __post_init__(self) -> None:
        # The rlhf_fast provider compiled too (its custom ops traced by Dynamo, placed by
        # Inductor): what compiling gains or costs per op, beside the plain call.
        if "rlhf_fast" in self.providers and COMPILED_RLHF_FAST not in self.providers:
            providers: dict[str, Fn | Provider] = {}
            for name, provider in self.providers.items():
                providers[name] = provider
                if name == "rlhf_fast":
                    providers[COMPILED_RLHF_FAST] = compiled_provider(provider)
            object.__setattr__(self, "providers", providers)

    def cases(self, quick: bool) -> list[Case]:
        """All cases, in table order: size, variant, mode, provider."""
        return [
            Case(self, shape, dtype, variant, mode, provider)
            for shape, dtype in (self.quick_sizes if quick else self.sizes)
            for variant in self.variants
            for mode in self.modes
            for provider in self.providers
            if not (provider.endswith("-inplace") and mode == "fwd")
        ]

    def headline_cases(self, quick: bool) -> list[Case]:
        """The cases of `rlhf-fast bench --headline`: the first (headline) size, the most
        complete mode (fwd+bwd where the suite has it), the `headline_variants`, every
        provider but the compiled ones (whose compilation alone would take minutes of a
        short GPU run)."""
        mode = "fwd+bwd" if "fwd+bwd" in self.modes else self.modes[-1]
        first = (self.quick_sizes if quick else self.sizes)[0]
        variants = self.variants if self.headline_variants is None else self.headline_variants
        return [case for case in self.cases(quick)
                if (case.shape, case.dtype) == first and case.mode == mode
                and case.variant in variants and not case.provider.startswith("compile")]

    def case(self, shape: Shape, mode: str, provider: str, *, dtype: Any = None,
             variant: str = "") -> Case:
        """One case, e.g. to gate a provider in a test; `dtype` may be left out where
        the suite has one dtype."""
        if dtype is None:
            (dtype,) = {d for _, d in [*self.sizes, *self.quick_sizes]}
        return Case(self, shape, dtype, variant, mode, provider)

    def unavailable(self, case: Case, device: torch.device) -> str | None:
        """Why `case` cannot run on `device` (None when it can)."""
        if case.provider.startswith("compile") and device.type != "cuda":
            return "torch.compile skipped in CPU quick mode"
        provider = self.providers[case.provider]
        for entry in provider.entries if isinstance(provider, Provider) else ():
            reason = entry.reason(device)
            if reason is not None:
                return reason
        return self.skip(case, device)

    def provider_fn(self, case: Case, device: torch.device) -> Fn:
        """The function of `case`'s provider (a peer's raises where it cannot run)."""
        provider = self.providers[case.provider]
        return provider.build(case, device) if isinstance(provider, Provider) else provider

    def row_args(self, case: Case) -> dict[str, Any]:
        """The columns that say what a row measured."""
        args = dict(op=self.op, shape=self.table_shape(case), dtype=case.dtype,
                    provider=case.provider, mode=case.mode)
        if case.variant:
            args["variant"] = case.variant
        return args

    def run_case(self, case: Case, session: Any, benchmark: Any
                 ) -> tuple[dict[str, Any], str | None]:
        """Gate and time one case. Returns its row and the pytest outcome to raise (or
        None). All tensors live in this frame, so they are freed before the caller
        raises a skip / xfail / fail (whose traceback would otherwise keep gigabytes
        alive)."""
        device = session.device
        row_args = self.row_args(case)
        reason = self.unavailable(case, device)
        if reason is not None:
            return make_row(status=status_skipped(reason), **row_args), "skip"

        if self.roofline == "gemm":
            rate = timing.gemm_rate(str(device))  # before this case allocates its inputs
        else:
            rate = session.copy_bandwidth
        inputs = self.make_inputs(case, device)
        row_args.update(self.describe(case, inputs))
        return gate_and_time(
            benchmark=benchmark, device=device, row_args=row_args,
            provider=lambda: self.provider_fn(case, device),
            gate=lambda fn: self.gate(case, inputs, fn),
            prepare=lambda fn: self.timed(case, inputs, fn),
            columns=lambda times: self.columns(case, inputs, times, rate),
            budget=self.budget(case),
        )

    def run_test(self, case: Case, session: Any, benchmark: Any) -> None:
        """A suite's test: run the case, record its row, raise its pytest outcome."""
        row, outcome = self.run_case(case, session, benchmark)
        session.add(row)
        report_outcome(row, outcome, case.provider)


def copy_bandwidth_columns(bytes_moved: Callable[[Case], int]
                           ) -> Callable[[Case, Any, dict[str, float], float], dict[str, Any]]:
    """A memory-bound suite's ``columns``: the bytes its case must move (GB/s and the
    fraction of the copy bandwidth follow, in `make_row`)."""

    def columns(case: Case, inputs: Any, times: dict[str, float], rate: float
                ) -> dict[str, Any]:
        return dict(bytes_moved=bytes_moved(case), copy_bandwidth=rate)

    return columns


def no_grad_call(fn: Fn, *args: Any) -> Timed:
    """The timed call of a forward-only provider: ``fn(*args)`` under ``torch.no_grad``
    (as a trainer runs the op), no per-call setup."""

    def timed() -> Any:
        with torch.no_grad():
            return fn(*args)

    return timed, None


#: The modes of a loss from logits, and how often each moves the scored logits: read
#: (fwd), read and the gradient written (bwd), both (fwd+bwd).
LOGITS_PASSES = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}


def logits_loss_suite(op: str, shapes: Sequence[Shape], quick_shapes: Sequence[Shape],
                      dtype: torch.dtype, providers: Mapping[str, Fn | Provider],
                      make_inputs: Callable[[Shape, torch.device], Any], *,
                      logits_shape: Callable[[Shape], Shape],
                      gate: Callable[[Case, Any, Fn], GateResult],
                      overwrite: Sequence[str], **fields: Any) -> Suite:
    """The `Suite` of a loss from logits ``[rows, T, V]`` (``logits_shape(shape)``, in
    `dtype`, the table's shape) scored at T - 1 positions, in every mode of
    `LOGITS_PASSES`: timed w.r.t. the logits (`timed_from_logits`; `overwrite`: the
    providers writing into them), its floor the scored logits moved once per pass.
    `fields`: the suite's other `Suite` fields."""

    def bytes_moved(case: Case) -> int:
        rows, t, v = logits_shape(case.shape)
        return LOGITS_PASSES[case.mode] * rows * (t - 1) * v * dtype.itemsize

    return Suite(
        op, sizes(shapes, dtype), sizes(quick_shapes, dtype), tuple(LOGITS_PASSES), providers,
        make_inputs=lambda case, device: make_inputs(case.shape, device),
        gate=gate,
        timed=timed_from_logits(overwrite),
        columns=copy_bandwidth_columns(bytes_moved),
        table_shape=lambda case: logits_shape(case.shape),
        **fields,
    )


def forward_call(args: Sequence[str]) -> Callable[[Case, Any, Fn], Timed]:
    """A forward-only suite's ``timed``: `no_grad_call` on ``inputs[a] for a in args``."""
    return lambda case, inputs, fn: no_grad_call(fn, *(inputs[a] for a in args))


def timed_from_logits(overwrite: Sequence[str]) -> Callable[[Case, Any, Fn], Timed]:
    """The ``timed`` of a loss from logits: `timed_calls` w.r.t. ``inputs.logits``, the
    provider called on ``inputs.args(logits)``; a provider named in `overwrite` (one that
    writes into the logits) gets a fresh copy per call."""
    return lambda case, inputs, fn: timed_calls(
        inputs.logits, lambda x: fn(*inputs.args(x)), case.mode,
        fresh=case.provider in overwrite)


def timed_calls(tensor: torch.Tensor, run: Callable[[torch.Tensor], Any], mode: str, *,
                fresh: bool, grads: Any = None) -> Timed:
    """The timed call of `mode` and its untimed per-call setup (or None), for a provider
    differentiated w.r.t. one input `tensor`: ``run(x)`` gives its outputs from `x`.

    ``fwd``: ``run(x)``; ``bwd``: ``autograd.grad(outputs, x, grads)`` alone, the forward
    building the graph running untimed before each call; ``fwd+bwd``: both. With `fresh`
    (a provider that writes into `tensor`) every call gets a fresh copy, made untimed.
    """
    backward = mode != "fwd"
    leaf = None if fresh else provider_input(tensor, backward, fresh=False)

    def new_input() -> torch.Tensor:
        return provider_input(tensor, backward, fresh=True) if fresh else leaf

    if mode == "bwd":  # the forward building the graph runs untimed before each call

        def forward() -> tuple[Any, torch.Tensor]:
            x = new_input()
            return run(x), x

        return (lambda state: torch.autograd.grad(state[0], state[1], grads)), forward

    def call(x: torch.Tensor) -> Any:
        out = run(x)
        return torch.autograd.grad(out, x, grads) if backward else out

    if fresh:
        return call, new_input
    return (lambda: call(leaf)), None


EXTRA_INFO_KEYS = ("variant", "median_ms", "p25_ms", "p75_ms", "peak_bytes", "bytes_moved", "gbps",
                   "frac_copy_bw", "status")


def record_extra_info(benchmark: Any, row: dict[str, Any]) -> None:
    """Copy a result row's numbers into pytest-benchmark's JSON (`extra_info`)."""
    for key in EXTRA_INFO_KEYS:
        if key in row:
            benchmark.extra_info[key] = row[key]
    benchmark.extra_info["rel_err"] = row.get("rel_err")


def report_outcome(row: dict[str, Any], outcome: str | None, provider: str) -> None:
    """Turn a case's outcome into the pytest result: skipped, xfail (a peer that failed the
    correctness gate) or fail (rlhf-fast itself failed it)."""
    if outcome == "skip":
        pytest.skip(row["status"])
    if outcome == "xfail":
        pytest.xfail(f"{provider} {row['status']}")
    if outcome == "fail":
        pytest.fail(f"{provider} {row['status']}: {row.get('rel_err')}")


def gate_and_time(
    *,
    benchmark: Any,
    device: torch.device,
    row_args: dict[str, Any],
    provider: Callable[[], Any],
    gate: Callable[[Any], GateResult],
    prepare: Callable[[Any], Timed],
    columns: Callable[[dict[str, float]], dict[str, Any]],
    budget: Budget = Budget(),
) -> tuple[dict[str, Any], str | None]:
    """The life of one benchmark case: gate, then time, then a row.

    ``provider()`` builds the provider's function ``fn`` (a peer may fail to, e.g. an
    import). ``gate(fn)`` runs it once against the reference and returns (ok, rel errors);
    a provider that fails it is reported "wrong" and not timed (a pytest failure for
    rlhf-fast, an xfail for a peer); a peer that raises, or any OOM, is a skipped row.
    ``prepare(fn)`` returns the timed call and its untimed per-call setup (or None).
    ``columns(timing)`` gives the row's roofline columns (``bytes_moved`` and
    ``copy_bandwidth``, or a suite's own, which also go to pytest-benchmark's extra_info).
    ``budget``: how long it is timed.

    Returns the row and the pytest outcome to raise (or None). The caller keeps the
    inputs in its own frame, so they are freed before it raises that outcome.
    """
    ours = row_args["provider"].startswith("rlhf_fast")
    try:
        fn = provider()
        ok, errors = gate(fn)
    except torch.cuda.OutOfMemoryError:
        return make_row(status=status_skipped("out of GPU memory"), **row_args), "skip"
    except Exception as exc:  # a peer that cannot run here (e.g. compile failing)
        if ours:
            raise
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
        return make_row(status=status_skipped(reason), **row_args), "skip"
    if not ok:
        row = make_row(status=status_wrong(max(errors.values())), rel_err=errors, **row_args)
        return row, "fail" if ours else "xfail"

    timed, setup = prepare(fn)
    try:
        times = timing.time_fn(timed, device=device, setup=setup, warmup_ms=budget.warmup_ms,
                               rep_ms=budget.rep_ms, cpu_repeats=budget.cpu_repeats)
        peak = timing.peak_memory_above(timed, device, setup=setup)
    except torch.cuda.OutOfMemoryError:
        status = status_skipped("out of GPU memory")
        return make_row(status=status, rel_err=errors, **row_args), "skip"

    extra = columns(times)
    row = make_row(timing=times, peak_bytes=peak, rel_err=errors, **extra, **row_args)
    record_extra_info(benchmark, row)
    for key in extra:
        if key in row:  # copy_bandwidth is consumed by make_row, not a row column
            benchmark.extra_info[key] = row[key]
    return row, None

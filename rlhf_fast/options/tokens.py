"""The option sets of the per-token ops: the log-prob ops (temperature, ignore_index, the
label check) and the divergences to a teacher (token_divergence, topk_token_divergence)."""

from __future__ import annotations

import math
from collections.abc import Callable

from rlhf_fast.ops.checks import INT64_MAX, INT64_MIN
from rlhf_fast.options.option_set import Accepts, Checked, Option, OptionSet, flag, one_of, real
from rlhf_fast.types import DIVERGENCES, TOPK_TAILS

# --------------------------------------------------------------- token log-probs

TOKEN_OPTIONS = OptionSet((
    Option("temperature", 1.0, real("a finite float > 0", lambda v: 0 < v < math.inf),
           "the logits are divided by it (1 / temperature reaches the kernels as two fp32 "
           "halves: exact to ~48 bits)"),
    Option("ignore_index", -100, Accepts(int, f"an int in [{INT64_MIN}, {INT64_MAX}] (int64)",
                                         lambda v: INT64_MIN <= v <= INT64_MAX),
           "labels equal to it give log-prob 0, entropy 0 and no gradient"),
))

#: The ops' own: the reference does not check labels.
LABEL_CHECK = OptionSet((
    Option("check_labels", None, flag(optional=True),
           "raise for labels outside [0, V) but ignore_index; None: on for CPU tensors, off "
           "for CUDA ones (the check needs a device sync); unchecked, such a row is NaN"),
))

#: What the log-prob ops take: the token options and the label check.
LOGPROB_OPTIONS = TOKEN_OPTIONS + LABEL_CHECK


# --------------------------------------------------------------- token_divergence


def _beta_only_with_jsd(values: Checked, label: Callable) -> None:
    if values.divergence != "jsd" and values.beta != 0.5:
        raise ValueError(
            f"{label('beta')} is read only by divergence 'jsd' (beta 0: forward KL, 1: "
            f"reverse KL); leave it at 0.5 for {values.divergence!r}, got {values.beta}")


#: What `token_divergence` takes beside the token options (temperature, ignore_index).
DIVERGENCE_OPTIONS = TOKEN_OPTIONS + OptionSet((
    Option("divergence", "jsd", one_of(DIVERGENCES),
           "jsd: TRL's generalized Jensen-Shannon divergence (beta weights the teacher); "
           "forward_kl: KL(teacher || student); reverse_kl: KL(student || teacher)"),
    Option("beta", 0.5, real("in [0, 1]", lambda v: 0 <= v <= 1),
           "jsd's mixture weight of the teacher, m = beta p + (1 - beta) q; 0 and 1 give "
           "the forward and reverse KL, as TRL's GKD and Liger's JSD define them"),
), rules=(_beta_only_with_jsd,))

#: `topk_token_divergence`'s: the divergence options and the tail's treatment.
TOPK_DIVERGENCE_OPTIONS = DIVERGENCE_OPTIONS + OptionSet((
    Option("tail", "bucket", one_of(TOPK_TAILS),
           "bucket: the mass outside the top k is one more outcome of both distributions "
           "(1 - their top-k sums); renormalize: both renormalised over the top k (TRL's "
           "server distillation, loss_add_tail True / False)"),
))

"""rlhf_fast.integrations.trl: TRL's fused LM head computed by linear_logprobs."""

import copy

import pytest
import torch
from trl.trainer import utils as trl_utils  # the test extra pins TRL

import rlhf_fast.integrations.trl as rlhf_trl
from helpers import rel_err
from rlhf_fast import reference

TRL_FUNCTION = trl_utils._ChunkedLogProbFunction


@pytest.fixture
def patched():
    rlhf_trl.patch_trl()
    yield
    rlhf_trl.unpatch_trl()


@pytest.fixture
def spy(monkeypatch):
    """The shapes of the hidden states every linear_logprobs call of the integration saw."""
    calls = []

    def counting(hidden, *args, **kwargs):
        calls.append(tuple(hidden.shape))
        return original(hidden, *args, **kwargs)

    original = rlhf_trl.linear_logprobs
    monkeypatch.setattr(rlhf_trl, "linear_logprobs", counting)
    return calls


def head_inputs(dtype, n=29, d=24, v=203, bias=True):
    hidden = torch.randn(n, d, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, d) / d**0.5).to(dtype).requires_grad_()
    b = torch.randn(v, dtype=dtype, requires_grad=True) if bias else None
    return hidden, weight, b, torch.randint(0, v, (n,))


@pytest.mark.parametrize("logit_scale", [1.0, 2.5])
@pytest.mark.parametrize("entropy", [False, True])
def test_patched_function_matches_reference(patched, spy, logit_scale, entropy):
    """The shim passes its tensors through untouched (bf16 accuracy of linear_logprobs
    itself: tests/test_linear_logprobs.py); here the argument mapping is checked."""
    hidden, weight, bias, targets = head_inputs(torch.float32)
    outputs = ("log_probs", "entropy") if entropy else ("log_probs",)
    result = trl_utils._ChunkedLogProbFunction.apply(
        hidden, weight, bias, targets, 0.7, 64, None, logit_scale, outputs)
    assert spy == [tuple(hidden.shape)]
    assert result[2:] == (None, None, None) and (result[1] is not None) == entropy
    leaves64 = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    ref = reference.linear_logprobs(leaves64[0], leaves64[1], targets, bias=leaves64[2],
                                    temperature=0.7 / logit_scale, return_entropy=True)
    n_out = 2 if entropy else 1
    upstream = [torch.randn(targets.shape, dtype=torch.float64) for _ in range(n_out)]
    for out, expected in zip(result[:n_out], ref):
        assert out.dtype == torch.float32
        assert rel_err(out, expected) < 1e-5
    grads = torch.autograd.grad(result[:n_out], (hidden, weight, bias),
                                [g.float() for g in upstream])
    expected_grads = torch.autograd.grad(ref[:n_out], leaves64, upstream)
    for grad, leaf, expected in zip(grads, (hidden, weight, bias), expected_grads):
        assert grad.dtype == leaf.dtype
        assert rel_err(grad, expected) < 1e-5


def test_agrees_with_trls_own_function(patched):
    """An independent implementation of the same math: TRL's chunked function."""
    hidden, weight, bias, targets = head_inputs(torch.float32)
    args = (targets, 1.3, 64, None, 1.0, ("log_probs", "entropy"))
    ours = trl_utils._ChunkedLogProbFunction.apply(hidden, weight, bias, *args)
    theirs = TRL_FUNCTION.apply(hidden, weight, bias, *args)
    upstream = [torch.randn(targets.shape) for _ in range(2)]
    for a, b in zip(ours[:2], theirs[:2]):
        assert rel_err(a, b) < 1e-5
    for a, b in zip(torch.autograd.grad(ours[:2], (hidden, weight, bias), upstream),
                    torch.autograd.grad(theirs[:2], (hidden, weight, bias), upstream)):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("case", ["softcap", "negative_scale", "is_top1", "mean_logits",
                                  "fp32_weight_bf16_hidden", "autocast_fp32_weight"])
def test_calls_it_cannot_serve_go_to_trl(patched, spy, case):
    hidden, weight, bias, targets = head_inputs(torch.float32, bias=False)
    softcap, scale, outputs = None, 1.0, ("log_probs", "entropy")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast_fp32_weight")
    if case == "softcap":
        softcap = 3.0
    elif case == "negative_scale":
        scale = -0.5
    elif case in ("is_top1", "mean_logits"):
        outputs += (case,)
    elif case == "fp32_weight_bf16_hidden":
        hidden = hidden.detach().bfloat16().requires_grad_()
    args = (hidden, weight, None, targets, 0.9, 64, softcap, scale, outputs)
    with autocast:
        ours = trl_utils._ChunkedLogProbFunction.apply(*args)
        theirs = TRL_FUNCTION.apply(*args)
    assert spy == []
    for a, b in zip(ours, theirs):
        assert (a is None and b is None) or torch.equal(a, b)


def test_autocast_with_fp32_weights_is_served_where_gemms_return_fp32(patched, spy,
                                                                        monkeypatch):
    """Where torch has fp32-output GEMMs (CUDA, torch >= 2.8), an fp32 model under bf16
    autocast runs on rlhf-fast: bf16 GEMMs, fp32 gradients, as TRL. On this CPU the
    products are rounded to bf16 on the way, so the gradients agree to bf16 here."""
    monkeypatch.setattr(rlhf_trl, "has_fp32_output_gemm", lambda device, dtype: True)
    # no bias: TRL adds it after the GEMM, in bf16 (a second rounding F.linear has not)
    hidden, weight, _, targets = head_inputs(torch.float32, bias=False)
    args = (targets, 0.9, 64, None, 1.0, ("log_probs", "entropy"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = trl_utils._ChunkedLogProbFunction.apply(hidden, weight, None, *args)
        theirs = TRL_FUNCTION.apply(hidden, weight, None, *args)
    assert spy == [tuple(hidden.shape)]
    for a, b in zip(ours[:2], theirs[:2]):
        assert rel_err(a, b) < 1e-5  # the same bf16 logits, softmax in fp32
    upstream = [torch.randn(targets.shape) for _ in range(2)]
    for a, b in zip(torch.autograd.grad(ours[:2], (hidden, weight), upstream),
                    torch.autograd.grad(theirs[:2], (hidden, weight), upstream)):
        assert a.dtype == b.dtype == torch.float32
        assert rel_err(a, b) < 1e-2


def test_fallbacks_warn_once_per_reason_and_are_counted(patched):
    """stats() counts served calls and fallbacks by reason; each reason warns once (a
    run makes thousands of calls), until reset_stats()."""
    import warnings

    rlhf_trl.reset_stats()
    hidden, weight, _, targets = head_inputs(torch.float32, bias=False)

    def call(softcap=None, outputs=("log_probs",)):
        trl_utils._ChunkedLogProbFunction.apply(hidden, weight, None, targets, 1.0, 64,
                                                softcap, 1.0, outputs)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
        for _ in range(3):
            call(softcap=3.0)
        call(outputs=("log_probs", "is_top1"))
        call(outputs=("log_probs", "is_top1"))
    messages = [str(w.message) for w in caught if w.category is rlhf_trl.FallbackWarning]
    assert len(messages) == 2
    assert "final-logit softcap" in messages[0] and "['is_top1']" in messages[1]
    counts = rlhf_trl.stats()
    assert (counts["served"], counts["fallen_back"]) == (1, 5)
    assert sorted(counts["fallback_reasons"].values()) == [2, 3]
    rlhf_trl.reset_stats()
    assert rlhf_trl.stats() == {"served": 0, "fallen_back": 0, "fallback_reasons": {}}
    with pytest.warns(rlhf_trl.FallbackWarning, match="final-logit softcap"):
        call(softcap=3.0)  # warned again after a reset


def test_patch_is_idempotent_and_undone():
    rlhf_trl.patch_trl()
    rlhf_trl.patch_trl()
    assert trl_utils._ChunkedLogProbFunction is rlhf_trl.RlhfFastLogProbFunction
    assert rlhf_trl.RlhfFastLogProbFunction.trl_function is TRL_FUNCTION
    rlhf_trl.unpatch_trl()
    rlhf_trl.unpatch_trl()
    assert trl_utils._ChunkedLogProbFunction is TRL_FUNCTION


def test_unknown_trl_internals_refused(monkeypatch):
    class Renamed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, temperature):
            return hidden

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Renamed)
    with pytest.raises(RuntimeError, match="patch_trl supports TRL versions"):
        rlhf_trl.patch_trl()
    assert trl_utils._ChunkedLogProbFunction is Renamed


def tiny_llama(vocab=211):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return AutoModelForCausalLM.from_config(config)


def test_model_with_trls_fused_head(spy):
    """What every TRL trainer calls: model(..., labels, fused_lm_head=True) after
    add_fused_lm_head, patched afterwards, against the model's own logits in float64."""
    model = tiny_llama()
    model64 = copy.deepcopy(model).double()
    trl_utils.add_fused_lm_head(model, temperature=0.8, outputs=("log_probs", "entropy"))
    ids = torch.randint(0, 211, (3, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[2, -3:] = -100
    valid = labels[:, 1:] != -100
    upstream = torch.randn(3, 11)

    rlhf_trl.patch_trl()
    try:
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        ((out.log_probs * upstream).sum() + 0.3 * out.entropy.sum()).backward()
    finally:
        rlhf_trl.unpatch_trl()
    assert len(spy) == 1

    logits = model64(input_ids=ids).logits[:, :-1]
    logp, entropy = reference.logprobs(logits, labels[:, 1:], temperature=0.8,
                                       return_entropy=True)
    entropy = entropy * valid
    ((logp * upstream.double()).sum() + 0.3 * entropy.sum()).backward()
    assert rel_err(out.log_probs, logp) < 1e-5
    assert rel_err(out.entropy, entropy) < 1e-5
    assert torch.equal(out.log_probs[~valid], torch.zeros(int((~valid).sum())))
    for p, p64 in zip(model.parameters(), model64.parameters()):
        assert rel_err(p.grad, p64.grad) < 1e-4


def test_trl_grpo_step_runs_on_rlhf_fast(spy, tmp_path):
    """One GRPOTrainer step, patched: the policy's log-probs come from linear_logprobs and
    the logged metrics and gradient match TRL's own head (fp32, no autocast)."""
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_fast import demo

    corpus = demo.read_jsonl(demo.DATA / "corpus.jsonl")
    tokenizer = demo.train_tokenizer([r["prompt"] for r in corpus])
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    prompts = Dataset.from_list([{"prompt": r["prompt"]} for r in corpus[:4]])

    def answer_length(completions, **kwargs):
        return [float(len(c)) for c in completions]

    def one_step(patch):
        (rlhf_trl.patch_trl if patch else rlhf_trl.unpatch_trl)()
        try:
            config = GRPOConfig(
                output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2,
                max_completion_length=6, max_steps=1, logging_steps=1, report_to=[],
                use_cpu=True, bf16=False, save_strategy="no", seed=0, disable_tqdm=True,
                beta=0.0, gradient_checkpointing=False)
            trainer = GRPOTrainer(model=demo.tiny_llama(tokenizer, hidden_size=32, seed=0),
                                  reward_funcs=answer_length, args=config,
                                  train_dataset=prompts, processing_class=tokenizer)
            trainer.train()
        finally:
            rlhf_trl.unpatch_trl()
        return trainer.state.log_history[0]

    ours = one_step(True)
    assert len(spy) == 1
    theirs = one_step(False)
    assert len(spy) == 1
    for key in ("reward", "entropy", "num_tokens", "completions/mean_length"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5)
    assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)

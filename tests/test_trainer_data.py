"""The trainers' data (`rlhf_fast.trainers.sources`, `rlhf_fast.trainers.data`): TRL's
dataset formats (standard and conversational; explicit and implicit prompt; prompt-only;
unpaired KTO) for each trainer kind, every source type, the tokenised cache, and errors
that name the record and field.

A tiny BPE tokenizer with a small chat template; no model runs, except the two trainer
constructions at the end (tiny models, no training step).
"""

import copy
import json

import datasets
import huggingface_hub.constants
import pytest
from trl.data_utils import extract_prompt, maybe_apply_chat_template

from rlhf_fast import demo
from rlhf_fast.trainers import data as trainer_data
from rlhf_fast.trainers.data import tokenized_pairs, tokenized_prompts
from rlhf_fast.trainers.sources import load_source

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXTS = ["What color is the sky?", "It is blue.", "It is green.", "Where is the sun?",
         "In the sky.", "In the sea.", "<|user|>", "<|assistant|>"]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# (answers that differ from their first character: an implicit prompt stops before them)
STRING_PAIRS = [{"prompt": "What color is the sky?", "chosen": " Blue.",
                 "rejected": " It is green."},
                {"prompt": "Where is the sun?", "chosen": " In the sky.",
                 "rejected": " Down in the sea."}]
CHAT_PAIRS = [{"prompt": [user(r["prompt"])], "chosen": [assistant(r["chosen"].strip())],
               "rejected": [assistant(r["rejected"].strip())]} for r in STRING_PAIRS]
IMPLICIT_STRING_PAIRS = [{"chosen": r["prompt"] + r["chosen"],
                          "rejected": r["prompt"] + r["rejected"]} for r in STRING_PAIRS]
IMPLICIT_CHAT_PAIRS = [{"chosen": r["prompt"] + r["chosen"],
                        "rejected": r["prompt"] + r["rejected"]} for r in CHAT_PAIRS]
STRING_KTO = [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
              for r in STRING_PAIRS for key in ("chosen", "rejected")]
CHAT_KTO = [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
            for r in CHAT_PAIRS for key in ("chosen", "rejected")]


@pytest.fixture(scope="module")
def tokenizer():
    tok = demo.train_tokenizer(TEXTS * 4, vocab_size=300)
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch):
    """`datasets` converts files into its cache: each test gets its own, offline."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def pairs_of(data, tokenizer, kind="pairs", **options):
    options = {"max_prompt_length": 64, "max_length": 128, "name": "data", **options}
    return tokenized_pairs(data, tokenizer, kind=kind, **options)


def ids(tokenizer, text, special=False):
    return tokenizer(text, add_special_tokens=special).input_ids


def expected_string_pair(tokenizer, record):
    """The trainers' rule for strings, unchanged: the prompt with special tokens, each
    answer without, then EOS."""
    eos = [tokenizer.eos_token_id]
    return {"prompt": ids(tokenizer, record["prompt"], special=True),
            "chosen": ids(tokenizer, record["chosen"]) + eos,
            "rejected": ids(tokenizer, record["rejected"]) + eos}


def expected_chat_pair(tokenizer, record):
    """TRL's rendering (maybe_apply_chat_template), tokenised without added specials."""
    text = maybe_apply_chat_template(record, tokenizer)
    return {key: ids(tokenizer, text[key]) for key in ("prompt", "chosen", "rejected")}


# --- formats ------------------------------------------------------------------------------


def test_string_pairs_keep_the_trainers_token_ids(tokenizer):
    pairs, labels = pairs_of(STRING_PAIRS, tokenizer)
    assert labels is None
    assert pairs == [expected_string_pair(tokenizer, r) for r in STRING_PAIRS]


def test_conversational_pairs_are_rendered_as_trl_renders_them(tokenizer):
    pairs, _ = pairs_of(CHAT_PAIRS, tokenizer)
    # by hand: the prompt ends with the generation prompt, each answer closes its turn
    assert tokenizer.decode(pairs[0]["prompt"]) == "<|user|>What color is the sky?<eos>" \
                                                   "<|assistant|>"
    assert tokenizer.decode(pairs[0]["chosen"]) == "Blue.<eos>"
    assert tokenizer.decode(pairs[1]["rejected"]) == "Down in the sea.<eos>"
    assert pairs == [expected_chat_pair(tokenizer, r) for r in CHAT_PAIRS]


def test_implicit_prompt_strings_split_at_the_common_prefix(tokenizer):
    # by hand: the common prefix is the prompt, its trailing space goes to the answers
    assert trainer_data.split_implicit_prompt("Hi there. Yes", "Hi there. No", "d", 0) == (
        "Hi there.", " Yes", " No")
    for record in IMPLICIT_STRING_PAIRS:
        trl = extract_prompt(record)
        assert trainer_data.split_implicit_prompt(record["chosen"], record["rejected"],
                                                  "d", 0) == (
            trl["prompt"], trl["chosen"], trl["rejected"])
    pairs, _ = pairs_of(IMPLICIT_STRING_PAIRS, tokenizer)
    assert pairs == [expected_string_pair(tokenizer, r) for r in STRING_PAIRS]


def test_implicit_prompt_conversations_split_at_the_common_messages(tokenizer):
    record = IMPLICIT_CHAT_PAIRS[0]
    prompt, chosen, rejected = trainer_data.split_implicit_prompt(
        record["chosen"], record["rejected"], "d", 0)
    assert (prompt, chosen, rejected) == ([user("What color is the sky?")],
                                          [assistant("Blue.")],
                                          [assistant("It is green.")])
    trl = extract_prompt(record)
    assert (prompt, chosen, rejected) == (trl["prompt"], trl["chosen"], trl["rejected"])
    pairs, _ = pairs_of(IMPLICIT_CHAT_PAIRS, tokenizer)
    assert pairs == [expected_chat_pair(tokenizer, r) for r in CHAT_PAIRS]
    # a string prompt beside conversational answers is ignored (TRL's maybe_extract_prompt)
    with_prompt = [{"prompt": "ignored", **r} for r in IMPLICIT_CHAT_PAIRS]
    assert pairs_of(with_prompt, tokenizer)[0] == pairs


@pytest.mark.parametrize("records", [STRING_KTO, CHAT_KTO], ids=["standard", "chat"])
def test_kto_records_pair_each_completion_with_the_next(tokenizer, records):
    pairs, labels = pairs_of(records, tokenizer, kind="kto")
    assert labels.tolist() == [True, False, True, False]
    for index, record in enumerate(records):
        following = records[(index + 1) % len(records)]
        if record is STRING_KTO[index]:
            mine = expected_string_pair(tokenizer, {"prompt": record["prompt"],
                                                    "chosen": record["completion"],
                                                    "rejected": following["completion"]})
        else:
            text = maybe_apply_chat_template(record, tokenizer)
            other = maybe_apply_chat_template(
                {**following, "prompt": following["prompt"]}, tokenizer)
            mine = {"prompt": ids(tokenizer, text["prompt"]),
                    "chosen": ids(tokenizer, text["completion"]),
                    "rejected": ids(tokenizer, other["completion"])}
        assert pairs[index] == mine


def test_prompts_standard_and_conversational(tokenizer):
    records, prompt_ids = tokenized_prompts(["Where is the sun?", "What color is the sky?"],
                                            tokenizer, max_prompt_length=64, name="prompts")
    texts = [r["prompt_text"] for r in records]
    assert texts == ["Where is the sun?", "What color is the sky?"]
    assert prompt_ids == [ids(tokenizer, t, special=True) for t in texts]
    conversations = [{"prompt": [user("Where is the sun?")]},
                     {"prompt": [user("Hi"), assistant("It is")]}]  # continued, TRL's rule
    records, prompt_ids = tokenized_prompts(conversations, tokenizer, max_prompt_length=64,
                                            name="prompts")
    assert [r["prompt"] for r in records] == [r["prompt"] for r in conversations]
    texts = [r["prompt_text"] for r in records]
    assert texts == [maybe_apply_chat_template(r, tokenizer)["prompt"] for r in conversations]
    assert texts[0] == "<|user|>Where is the sun?<eos><|assistant|>"
    assert prompt_ids == [ids(tokenizer, t) for t in texts]
    _, short = tokenized_prompts(conversations, tokenizer, max_prompt_length=3, name="p")
    assert short == [i[-3:] for i in prompt_ids]


def test_answers_are_cut_to_max_length_and_prompts_keep_their_end(tokenizer):
    full, _ = pairs_of(STRING_PAIRS, tokenizer)
    cut, _ = pairs_of(STRING_PAIRS, tokenizer, max_prompt_length=2, max_length=4)
    for whole, short in zip(full, cut):
        assert short["prompt"] == whole["prompt"][-2:]
        assert short["chosen"] == whole["chosen"][:2]


# --- sources ------------------------------------------------------------------------------


def write_sources(tmp_path, records):
    """The same records as every kind of source; returns {kind: source}."""
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    as_json = tmp_path / "data.json"
    as_json.write_text(json.dumps(records))
    dataset = datasets.Dataset.from_list(records)
    dataset.to_parquet(str(tmp_path / "data.parquet"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    splits = datasets.DatasetDict({"train": dataset, "test": dataset.select([0])})
    splits.save_to_disk(str(tmp_path / "saved_splits"))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train.jsonl").write_text(jsonl.read_text())
    return {"list": records, "jsonl": jsonl, "jsonl as str": str(jsonl), "json": as_json,
            "parquet": tmp_path / "data.parquet", "Dataset": dataset, "DatasetDict": splits,
            "saved Dataset": tmp_path / "saved", "saved DatasetDict": tmp_path / "saved_splits",
            "folder of files": tmp_path / "files"}


@pytest.mark.parametrize("records", [STRING_PAIRS, CHAT_PAIRS, IMPLICIT_CHAT_PAIRS],
                         ids=["standard", "chat", "implicit chat"])
def test_every_source_gives_the_same_pairs(tokenizer, tmp_path, records):
    expected, _ = pairs_of(records, tokenizer)
    for kind, source in write_sources(tmp_path, records).items():
        assert pairs_of(source, tokenizer)[0] == expected, kind


def test_a_split_is_picked_by_name(tokenizer, tmp_path):
    sources = write_sources(tmp_path, STRING_PAIRS)
    first = pairs_of(STRING_PAIRS[:1], tokenizer)[0]
    for source in (sources["DatasetDict"], sources["saved DatasetDict"]):
        assert pairs_of(source, tokenizer, split="test")[0] == first
        with pytest.raises(ValueError, match=r"data has no split 'dev'; its splits: "
                                             r"\['train', 'test'\]"):
            pairs_of(source, tokenizer, split="dev")


def test_a_file_is_tokenised_once_then_read_from_the_cache(tokenizer, tmp_path, monkeypatch):
    path = write_sources(tmp_path, STRING_PAIRS)["jsonl"]
    calls = []
    original = trainer_data.tokenize_batch

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_data, "tokenize_batch", counting)
    first, _ = pairs_of(path, tokenizer)
    assert len(calls) == 1
    dataset = load_source(path, "pairs", "data")
    cached = trainer_data.tokenize_dataset(dataset, "pairs", tokenizer, "data")
    assert len(calls) == 1  # the same file and tokenizer: the cache, not the tokenizer
    assert cached.cache_files and all(f["filename"].startswith(str(tmp_path / "hf-cache"))
                                      for f in cached.cache_files)
    assert pairs_of(path, tokenizer)[0] == first and len(calls) == 1
    other = copy.deepcopy(tokenizer)
    other.chat_template = CHAT_TEMPLATE + " "
    pairs_of(path, other)  # another tokenizer (its template differs): tokenised again
    assert len(calls) == 2


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("records, kind, message", [
    ([STRING_PAIRS[0], {**STRING_PAIRS[1], "chosen": 3}], "pairs",
     "data[1]: field 'chosen' must be a string or a list of messages, got int"),
    ([STRING_PAIRS[0], {"prompt": "p", "chosen": "c"}], "pairs",
     "data[1] needs a string field 'rejected', got None"),
    ([{**CHAT_PAIRS[0], "chosen": [{"role": "assistant"}]}], "pairs",
     "data[0]: field 'chosen' must be a string or a non-empty list of messages"),
    ([STRING_KTO[0], {**STRING_KTO[1], "label": "yes"}], "kto",
     "data[1] needs a bool field 'label' (desirable or not), got 'yes'"),
    ([{"chosen": "Yes.", "rejected": "No."}], "pairs",
     "data[0]: 'chosen' and 'rejected' share no prompt"),
    ([{"prompt": [user("Hi"), {"role": "system", "content": "x"}]}], "prompts",
     "data[0]: field 'prompt' must end with a user, tool or assistant message"),
    (["fine", 7], "prompts",
     "data[1] must be a dict with fields ['prompt'], got int"),
    ([], "pairs", "data is empty"),
])
def test_errors_name_the_record_and_the_field(tokenizer, records, kind, message):
    with pytest.raises(ValueError) as error:
        if kind == "prompts":
            tokenized_prompts(records, tokenizer, max_prompt_length=8, name="data")
        else:
            pairs_of(records, tokenizer, kind=kind)
    assert message in str(error.value)


def test_dataset_columns_are_checked_by_their_schema(tokenizer):
    nulls = datasets.Dataset.from_list([STRING_PAIRS[0], {**STRING_PAIRS[1],
                                                          "rejected": None}])
    with pytest.raises(ValueError, match=r"data\[1\] needs a string field 'rejected', got"):
        pairs_of(nulls, tokenizer)
    numbers = datasets.Dataset.from_dict({"prompt": ["p"], "chosen": [1], "rejected": [2]})
    with pytest.raises(ValueError, match=r"data\[0\]: field 'chosen' must be a string or a "
                                         r"list of messages, got int"):
        pairs_of(numbers, tokenizer)


def test_conversations_need_a_chat_template(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match=r"data\[0\]: field 'prompt' is a list of messages, "
                                         "but the tokenizer has no chat_template"):
        pairs_of(CHAT_PAIRS, plain)


def test_bad_files_and_ids_are_clear_errors(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(STRING_PAIRS[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"data: .* line 2 is not JSON"):
        pairs_of(path, tokenizer)
    path.write_text(json.dumps(STRING_PAIRS[0]) + "\n"
                    + json.dumps({**STRING_PAIRS[1], "chosen": 3}) + "\n")
    with pytest.raises(ValueError, match=r"data\[1\]: field 'chosen' must be a string"):
        pairs_of(path, tokenizer)
    with pytest.raises(FileNotFoundError, match="data: no file at"):
        pairs_of(tmp_path / "missing.jsonl", tokenizer)
    with pytest.raises(ValueError, match=r"data: 'nobody/no-such-dataset' is not a local file "
                                         r"or folder, and datasets.load_dataset could not"):
        pairs_of("nobody/no-such-dataset", tokenizer)


# --- the trainers -------------------------------------------------------------------------


def test_dpo_trainer_takes_conversations_and_an_eval_split(tokenizer, tmp_path):
    from rlhf_fast.trainers import DPOConfig, DPOTrainer

    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(IMPLICIT_CHAT_PAIRS),
                                   "test": datasets.Dataset.from_list(CHAT_PAIRS[:1])})
    config = DPOConfig(output_dir=str(tmp_path / "run"), batch_size=2, device="cpu",
                       eval_split="test")
    trainer = DPOTrainer(demo.tiny_llama(tokenizer, hidden_size=32), tokenizer=tokenizer,
                         train_dataset=splits, config=config)
    assert trainer.train_pairs == [expected_chat_pair(tokenizer, r) for r in CHAT_PAIRS]
    assert trainer.eval_pairs == [expected_chat_pair(tokenizer, CHAT_PAIRS[0])]
    with pytest.raises(ValueError, match="eval_split='test' with no eval_dataset needs"):
        DPOTrainer(demo.tiny_llama(tokenizer, hidden_size=32), tokenizer=tokenizer,
                   train_dataset=CHAT_PAIRS, config=config)


def test_ppo_trainer_takes_conversational_prompts(tokenizer, tmp_path):
    from rlhf_fast.trainers import PPOConfig, PPOTrainer

    prompts = [{"prompt": [user("Where is the sun?")]}, {"prompt": [user("Hi")]}]
    trainer = PPOTrainer(demo.tiny_llama(tokenizer, hidden_size=32), tokenizer=tokenizer,
                         prompts=prompts, reward_fn_or_model=demo.kindness_reward,
                         config=PPOConfig(output_dir=str(tmp_path / "run"), device="cpu",
                                          rollout_batch_size=2, mini_batch_size=2))
    assert trainer.prompts[0] == "<|user|>Where is the sun?<eos><|assistant|>"
    assert trainer.prompt_ids[0] == ids(tokenizer, trainer.prompts[0])

"""Reward functions, answer extraction, task files, and rewards plugged in through `_target_`."""

from __future__ import annotations

import importlib.util
import json

import pytest
from trainer_helpers import ROOT, compose_typed

from trainers.config import TaskConfig
from trainers.ppo import build_reward
from trainers.rewards import addition_reward, extract_answer, gsm8k_reward
from trainers.tasks import addition_examples, build_task, load_records

SAMPLE = ROOT / "trainers" / "data" / "gsm8k_sample.jsonl"


@pytest.mark.parametrize(
    "response, answer, expected",
    [
        ("7", "7", 1.0),
        (" 7", "7", 1.0),
        ("6", "7", 0.5 * 0.75),  # one away, tolerance 4
        ("11", "7", 0.0),  # tolerance away
        ("7x", "7", 0.5),  # did not stop: halved
        ("x7", "7", 0.0),  # no leading integer
        ("", "7", 0.0),
    ],
)
def test_addition_reward(response, answer, expected):
    assert addition_reward(response, answer, tolerance=4) == pytest.approx(expected)


def test_addition_examples_cover_every_pair():
    examples = addition_examples(2)
    assert len(examples) == 9
    assert {(e.prompt, e.answer) for e in examples} >= {("0+0=", "0"), ("2+1=", "3"), ("2+2=", "4")}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so 3 * 4 = 12 apples.\n#### 12", "12"),
        ("#### 1,200", "1200"),
        ("The answer is 42.", "42"),
        ("It is 3.50 dollars", "3.5"),
        ("no digits here", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_gsm8k_reward():
    assert gsm8k_reward("3 * 4 = 12\n#### 12", "12") == 1.0
    assert gsm8k_reward("I think 13", "12", format_score=0.1) == 0.1
    assert gsm8k_reward("no idea", "12") == 0.0


def test_gsm8k_task_reads_the_sample_file_in_every_format(tmp_path):
    rows = load_records(SAMPLE)
    assert len(rows) >= 10
    as_json = tmp_path / "rows.json"
    as_json.write_text(json.dumps(rows))
    for path in (SAMPLE, as_json):
        task = build_task(
            TaskConfig(
                name="gsm8k",
                data_path=str(path),
                num_eval_prompts=4,
                prompt_template="Q: {question}\nA:",
            )
        )
        assert len(task.train) == len(rows) and len(task.eval) == 4
        first = task.train[0]
        assert (
            first.prompt.startswith("Q: Tom has")
            and first.answer == "12"
            and "####" in first.completion
        )
    assert task.batch(3, 5) == task.batch(3, 5), "a step's prompts are a function of (seed, step)"


def test_parquet_needs_pyarrow_with_a_clear_error(tmp_path):
    path = tmp_path / "rows.parquet"
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(load_records(SAMPLE)), path)
        assert len(load_records(path)) == len(load_records(SAMPLE))
    else:
        path.write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="needs pyarrow"):
            load_records(path)


def test_task_file_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_records(tmp_path / "missing.jsonl")
    bad = tmp_path / "rows.csv"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match="expected a .json, .jsonl or .parquet"):
        load_records(bad)
    wrong_key = tmp_path / "rows.jsonl"
    wrong_key.write_text(json.dumps({"q": "1+1?", "answer": "#### 2"}) + "\n")
    with pytest.raises(KeyError, match="no key 'question'"):
        build_task(TaskConfig(name="gsm8k", data_path=str(wrong_key)))


def exact_match(response: str, answer: str, bonus: float = 0.0) -> float:
    """A user's own reward, plugged in by `_target_` in the tests below."""
    return min(1.0, float(response.strip() == answer) + bonus)


def test_reward_is_chosen_by_target_with_keyword_arguments():
    fn = build_reward(
        {"_target_": "trainers.rewards.addition_reward", "_partial_": True, "tolerance": 2}
    )
    assert fn("6", "7") == pytest.approx(0.25)
    assert build_reward({"_target_": "trainers.rewards.AdditionReward", "tolerance": 2})(
        "6", "7"
    ) == pytest.approx(0.25)
    assert (
        build_reward({"_target_": "trainers.rewards.Gsm8kReward", "format_score": 0.3})(
            "I think 13", "12"
        )
        == 0.3
    )
    mine = build_reward({"_target_": f"{__name__}.exact_match", "_partial_": True, "bonus": 0.5})
    assert mine("3", "3") == 1.0 and mine("4", "3") == 0.5


def test_the_shipped_rewards_are_called_directly_not_through_hydras_per_call_check():
    """A `_partial_` node comes back as Hydra's partial subclass, authorized at every call (~0.1 ms, 50 ms a
    step); the defaults are instances, built once."""
    import functools

    for node in (compose_typed().task.reward, compose_typed(["task=gsm8k"]).task.reward):
        fn = build_reward(node)
        assert not isinstance(fn, functools.partial), (node, type(fn))


def test_a_bad_reward_target_fails_clearly():
    with pytest.raises(ValueError, match="task.reward=.*no_such_reward"):
        build_reward({"_target_": "trainers.rewards.no_such_reward", "_partial_": True})
    with pytest.raises(ValueError, match="not callable"):
        build_reward({"_target_": "builtins.float", "_args_": [1]})

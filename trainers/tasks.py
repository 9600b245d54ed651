"""Prompt sets for RL: the default toy addition task and GSM8K-style math read from a local file.

An `Example` carries the prompt, the supervised completion used by the warm-start, and the
reference answer handed to the reward function.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from trainers.config import TaskConfig, TaskName


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str  # supervised target of the warm-start
    answer: str  # reference handed to the reward function


@dataclass
class Task:
    """Train and eval examples; `batch(step, k)` is a deterministic function of (seed, step).

    Example:
        task = build_task(TaskConfig(), seed=0)
        examples = task.batch(step=1, num_prompts=16)
    """

    train: list[Example]
    eval: list[Example]
    seed: int = 0

    def batch(self, step: int, num_prompts: int) -> list[Example]:
        rng = random.Random(self.seed * 1_000_003 + step)
        return [self.train[rng.randrange(len(self.train))] for _ in range(num_prompts)]


def addition_examples(max_operand: int) -> list[Example]:
    """Every `a+b=` with 0 <= a, b <= max_operand; the answer is the decimal sum."""
    return [
        Example(prompt=f"{a}+{b}=", completion=str(a + b), answer=str(a + b))
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
    ]


def load_records(path: str | Path) -> list[dict]:
    """Rows of a local .json (a list of objects), .jsonl or .parquet file (parquet needs pyarrow)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"task.data_path={str(path)!r} does not exist")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise ValueError(f"{path} must hold a JSON list of objects, got {type(rows).__name__}")
        return rows
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(
                f"reading {path} needs pyarrow: pip install -e '.[data]' (or pip install pyarrow)"
            ) from None
        return pq.read_table(path).to_pylist()
    raise ValueError(f"task.data_path={str(path)!r}: expected a .json, .jsonl or .parquet file")


def math_examples(cfg: TaskConfig) -> list[Example]:
    from trainers.rewards import extract_answer

    examples = []
    for i, row in enumerate(load_records(cfg.data_path)):
        for key in (cfg.question_key, cfg.answer_key):
            if key not in row:
                raise KeyError(
                    f"row {i} of {cfg.data_path} has no key {key!r} (keys: {sorted(row)})"
                )
        solution = str(row[cfg.answer_key])
        answer = extract_answer(solution)
        if answer is None:
            raise ValueError(f"row {i} of {cfg.data_path}: no final answer in {solution!r}")
        prompt = cfg.prompt_template.format(question=row[cfg.question_key])
        examples.append(Example(prompt=prompt, completion=solution, answer=answer))
    return examples


def build_task(cfg: TaskConfig, seed: int = 0) -> Task:
    if cfg.name is TaskName.toy:
        examples = addition_examples(cfg.max_operand)
    elif cfg.name is TaskName.gsm8k:
        if cfg.data_path is None:
            raise ValueError(
                "task=gsm8k needs task.data_path (a local .json, .jsonl or .parquet file)"
            )
        examples = math_examples(cfg)
    else:
        raise AssertionError(cfg.name)
    rng = random.Random(seed)
    eval_examples = rng.sample(examples, min(cfg.num_eval_prompts, len(examples)))
    return Task(train=examples, eval=eval_examples, seed=seed)

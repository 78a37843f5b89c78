import itertools
import json
import os
import re

from rouge_score import rouge_scorer

SEED_PATH = os.path.join(os.path.dirname(__file__), "..", "seed_tasks.jsonl")
EXPECTED_COUNT = 175
KEYS = ["id", "name", "instruction", "instances", "is_classification"]
# The recipe drops a generated instruction whose ROUGE-L with any kept one is above 0.7,
# so the seeds themselves must pass the same bar against each other.
ROUGE_THRESHOLD = 0.7


def load_seeds():
    with open(SEED_PATH, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8")
    assert text.endswith("\n"), "seed_tasks.jsonl: file must end with a newline"
    tasks = []
    for lineno, line in enumerate(text.split("\n")[:-1], start=1):
        assert line.strip(), f"seed_tasks.jsonl:{lineno}: blank line"
        try:
            tasks.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise AssertionError(f"seed_tasks.jsonl:{lineno}: invalid JSON: {e}") from None
    return tasks


def test_count_keys_and_ids():
    tasks = load_seeds()
    assert len(tasks) == EXPECTED_COUNT
    for lineno, task in enumerate(tasks, start=1):
        assert isinstance(task, dict), f"seed_tasks.jsonl:{lineno}: not a JSON object"
        assert list(task) == KEYS, f"seed_tasks.jsonl:{lineno}: keys {list(task)} != {KEYS}"
        assert task["id"] == f"seed_task_{lineno - 1}", f"seed_tasks.jsonl:{lineno}: field 'id' out of sequence"


def test_names_are_unique_snake_case():
    tasks = load_seeds()
    for lineno, task in enumerate(tasks, start=1):
        name = task["name"]
        assert isinstance(name, str) and re.fullmatch(r"[a-z][a-z0-9_]*", name), (
            f"seed_tasks.jsonl:{lineno}: field 'name' {name!r} is not snake_case")
    names = [t["name"] for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"duplicate names: {duplicates}"


def test_instructions_are_natural_text():
    tasks = load_seeds()
    for lineno, task in enumerate(tasks, start=1):
        instruction = task["instruction"]
        assert isinstance(instruction, str), f"seed_tasks.jsonl:{lineno}: field 'instruction' not a string"
        assert instruction == instruction.strip(), f"seed_tasks.jsonl:{lineno}: 'instruction' has stray whitespace"
        assert len(instruction.split()) > 3, f"seed_tasks.jsonl:{lineno}: 'instruction' has 3 words or fewer"
        first = instruction[0]
        assert first.isascii() and first.isalnum(), (
            f"seed_tasks.jsonl:{lineno}: 'instruction' starts with {first!r}, not an ASCII letter or digit")
    instructions = [t["instruction"] for t in tasks]
    assert len(set(instructions)) == len(instructions), "duplicate instructions"


def test_each_task_has_one_instance_with_text():
    tasks = load_seeds()
    for lineno, task in enumerate(tasks, start=1):
        instances = task["instances"]
        assert isinstance(instances, list) and len(instances) == 1, (
            f"seed_tasks.jsonl:{lineno}: field 'instances' must hold exactly one instance")
        instance = instances[0]
        assert isinstance(instance, dict) and list(instance) == ["input", "output"], (
            f"seed_tasks.jsonl:{lineno}: instance keys must be ['input', 'output']")
        assert isinstance(instance["input"], str), f"seed_tasks.jsonl:{lineno}: field 'input' not a string"
        assert isinstance(instance["output"], str), f"seed_tasks.jsonl:{lineno}: field 'output' not a string"
        assert instance["output"].strip(), f"seed_tasks.jsonl:{lineno}: field 'output' is empty"
        assert instance["input"] == instance["input"].strip(), f"seed_tasks.jsonl:{lineno}: 'input' has stray whitespace"


def test_task_mix():
    tasks = load_seeds()
    for lineno, task in enumerate(tasks, start=1):
        assert type(task["is_classification"]) is bool, (
            f"seed_tasks.jsonl:{lineno}: field 'is_classification' must be true or false")
    n_classification = sum(t["is_classification"] for t in tasks)
    assert 20 <= n_classification <= 30, f"{n_classification} classification tasks, expected about 25"
    n_with_input = sum(bool(t["instances"][0]["input"]) for t in tasks)
    assert 0.35 <= n_with_input / len(tasks) <= 0.45, f"{n_with_input} tasks with input, expected about 40%"


def test_instructions_pass_the_projects_rouge_filter():
    # Fails with ImportError until generate_instructions.py is present; that is deliberate.
    from generate_instructions import RougeIndex

    index = RougeIndex()
    for lineno, task in enumerate(load_seeds(), start=1):
        if lineno > 1:
            scores = index.scores(task["instruction"])
            assert len(scores) == lineno - 1
            worst = float(max(scores))
            assert worst <= ROUGE_THRESHOLD, (
                f"seed_tasks.jsonl:{lineno}: instruction too similar to line {int(scores.argmax()) + 1} "
                f"(ROUGE-L {worst:.3f})")
        index.add(task["instruction"])


def test_instructions_pairwise_rouge_l_with_rouge_score():
    instructions = [t["instruction"] for t in load_seeds()]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    worst = (0.0, 0, 0)
    for i, j in itertools.combinations(range(len(instructions)), 2):
        f = scorer.score(instructions[i], instructions[j])["rougeL"].fmeasure
        worst = max(worst, (f, i, j))
    f, i, j = worst
    assert f <= ROUGE_THRESHOLD, (
        f"seed_tasks.jsonl:{j + 1}: instruction too similar to line {i + 1} (ROUGE-L {f:.3f})")

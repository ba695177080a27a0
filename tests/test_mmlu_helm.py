"""MMLU the way HELM asks it (``evaluate/mmlu.py --style helm``): the prompt equals a HELM prompt written out by hand
from crfm-helm's adapter settings, and the shots are the dev examples HELM draws, in HELM's order."""

import pytest

from lit_adapter.errors import UserError
from lit_adapter.evaluation.mmlu import Question, build_helm_prompt, build_prompt, helm_shots, read_csv, run_mmlu

SHOT_1 = Question("Find the order of 2 in Z_5.", ("1", "2", "4", "5"), 2)
SHOT_2 = Question("Is Z_4 cyclic?", ("Yes", "No", "Only mod 2", "Undefined"), 0)
TEST = Question("What is 1 + 1 in Z_2?", ("0", "1", "2", "3"), 0)

# crfm-helm's mmlu run spec (get_mmlu_spec -> get_multiple_choice_adapter_spec, ADAPT_MULTIPLE_CHOICE_JOINT):
# instructions "... about {subject with spaces}." + "\n", input_prefix "Question: ", input_suffix "\n", reference
# prefix "A. " / suffix "\n", output_prefix "Answer: ", output_suffix "\n", blocks joined by instance_prefix "\n";
# the test block ends with output_prefix.rstrip(). Written out by hand:
HELM_PROMPT = (
    "The following are multiple choice questions (with answers) about abstract algebra.\n"
    "\n"
    "Question: Find the order of 2 in Z_5.\n"
    "A. 1\n"
    "B. 2\n"
    "C. 4\n"
    "D. 5\n"
    "Answer: C\n"
    "\n"
    "Question: Is Z_4 cyclic?\n"
    "A. Yes\n"
    "B. No\n"
    "C. Only mod 2\n"
    "D. Undefined\n"
    "Answer: A\n"
    "\n"
    "Question: What is 1 + 1 in Z_2?\n"
    "A. 0\n"
    "B. 1\n"
    "C. 2\n"
    "D. 3\n"
    "Answer:"
)


def test_helm_prompt_equals_the_written_out_helm_example():
    assert build_helm_prompt("abstract_algebra", [SHOT_1, SHOT_2], TEST) == HELM_PROMPT
    # and where it differs from Hendrycks' (ours by default): the subject's spaces and "Question: "
    ours = build_prompt("abstract_algebra", [SHOT_1, SHOT_2], TEST)
    assert ours.startswith("The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
                           "Find the order of 2 in Z_5.\nA. 1\n")
    assert build_helm_prompt("abstract_algebra", [], TEST) == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Question: What is 1 + 1 in Z_2?\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer:")


def test_helm_shots_are_every_dev_example_reordered_by_label(shared_data):
    dev = read_csv(shared_data / "mmlu" / "dev" / "abstract_algebra_dev.csv")
    shots = helm_shots(dev, 5)
    assert sorted(map(dev.index, shots)) == list(range(5))  # 5 of 5: all of them, only the order is HELM's
    assert helm_shots(dev, 5) == shots  # seeded: the same for every question and every run
    assert len(helm_shots(dev, 2)) == 2
    # labels that occur more often come first: two questions answered "True" before one-offs
    pool = [Question("q1", ("True", "False", "x", "y"), 0), Question("q2", ("a", "b", "c", "d"), 3),
            Question("q3", ("False", "True", "x", "y"), 1)]
    assert helm_shots(pool, 1)[0].choices[helm_shots(pool, 1)[0].answer] == "True"


def test_helm_style_runs_and_reports_the_greedy_exact_match(stories260k, shared_data, capsys):
    report = run_mmlu(stories260k, k=1, subjects="abstract_algebra", max_questions_per_subject=3,
                      data_dir=shared_data / "mmlu", device="cpu", style="helm")
    assert report["style"] == "helm" and report["questions"] == 3
    # stories260K's vocabulary splits " A" into two pieces: no single next-token distribution to read HELM's
    # greedy exact match from, so it is not reported rather than guessed
    assert report["greedy_exact_match_micro"] is None
    with pytest.raises(UserError, match="--style"):
        run_mmlu(stories260k, k=1, subjects="abstract_algebra", max_questions_per_subject=1,
                 data_dir=shared_data / "mmlu", device="cpu", style="helm-lite")


def test_helm_prompts_equal_those_crfm_helm_itself_built(shared_data):
    """tests/fixtures/helm_mmlu_prompts.json holds prompts that crfm-helm 0.5.16's own adapter code built from the
    same CSVs (in a separate venv: crfm-helm is not a dependency); ours, shots and all, are the same text."""
    import json
    from pathlib import Path

    recorded = json.loads((Path(__file__).parent / "fixtures" / "helm_mmlu_prompts.json").read_text())
    assert recorded["adapter_spec"]["max_train_instances"] == 5 and recorded["adapter_spec"]["input_prefix"] == \
        "Question: "
    for subject, helm in recorded["subjects"].items():
        dev = read_csv(shared_data / "mmlu" / "dev" / f"{subject}_dev.csv")
        test = read_csv(shared_data / "mmlu" / "test" / f"{subject}_test.csv")
        shots = helm_shots(dev, 5)
        assert [s.question for s in shots] == helm["shot_questions"]
        assert [build_helm_prompt(subject, shots, q) for q in test[:len(helm["prompts"])]] == helm["prompts"]

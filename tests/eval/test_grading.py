"""The grader on real answers from the shipped benchmarks: every verdict is asserted."""

from __future__ import annotations

import json
import time
from importlib import resources

import pytest

from psft.trainer.eval.grading import (
    GradeTask,
    GradingPool,
    Verdict,
    extract_answer_phrase,
    extract_boxed,
    extract_choice,
    grade,
    grade_choice,
    grade_math,
    normalize_answer,
)

BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "minerva")


def _references() -> dict[str, str]:
    refs = {}
    data = resources.files("psft.trainer.eval") / "data"
    for name in BENCHMARKS:
        for line in (data / f"{name}.jsonl").read_text().splitlines():
            row = json.loads(line)
            refs[row["id"]] = row["answer"]
    return refs


REFS = _references()


def test_shipped_references_are_all_there() -> None:
    counts = {b: sum(k.startswith(b + "-") for k in REFS) for b in BENCHMARKS}
    assert counts == {"aime24": 30, "aime25": 30, "amc23": 40, "math500": 500, "minerva": 272}


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_every_reference_is_graded_correct_against_itself(benchmark: str) -> None:
    wrong = [
        (key, ref)
        for key, ref in REFS.items()
        if key.startswith(benchmark + "-")
        and not grade_math(f"Reasoning... so the answer is $\\boxed{{{ref}}}$.", ref)
    ]
    assert wrong == []


# (benchmark row, candidate answer, expected verdict)
TABLE: list[tuple[str, str, bool]] = [
    # equivalent forms
    ("math500-219", "0.5", True),  # \frac{1}{2}
    ("math500-219", "1/2", True),
    ("math500-219", "\\dfrac{1}{2}", True),
    ("math500-219", "\\frac12", True),
    ("math500-0", "(3,\\pi/2)", True),  # \left( 3, \frac{\pi}{2} \right)
    ("math500-0", "\\left(3, \\dfrac{\\pi}{2}\\right)", True),
    ("math500-206", "(1.5, -13)", True),  # \left( \frac{3}{2}, -13 \right)
    ("math500-7", "90", True),  # 90^\circ
    ("math500-7", "90^{\\circ}", True),
    ("math500-7", "90°", True),
    ("math500-166", "\\frac{270}{7}", True),  # \frac{270}7\text{ degrees}
    ("math500-166", "\\frac{270}{7}^\\circ", True),
    ("math500-257", "864", True),  # 864 \mbox{ inches}^2
    ("math500-257", "864 \\text{ inches}^2", True),
    ("math500-467", "15", True),  # 15\mbox{ cm}^2
    ("math500-301", "5.4", True),  # 5.4 \text{ cents}
    ("math500-198", "10080", True),  # 10,\!080
    ("math500-198", "10,080", True),
    ("math500-217", "11111111100", True),  # 11,\! 111,\! 111,\! 100
    ("math500-242", "32348", True),  # \$32,\!348
    ("math500-242", "\\$32,348", True),
    ("math500-459", "18.90", True),  # \$18.90
    ("math500-459", "18.9", True),
    ("math500-23", "5", True),  # x=5
    ("math500-23", "x = 5", True),
    ("math500-4", "Evelyn", True),  # \text{Evelyn}
    ("math500-97", "East", True),  # \text{east}
    ("math500-227", "C", True),  # \text{(C)}
    ("math500-227", "(C)", True),
    ("math500-96", "1+\\sqrt{19}, 1-\\sqrt{19}", True),  # 1 \pm \sqrt{19}
    ("math500-422", "\\{-2, 1+\\sqrt5, 1-\\sqrt5\\}", True),  # \{1\pm\sqrt{5},-2\}
    ("math500-25", "-2, 1", True),  # 1,-2
    ("math500-36", "7, 5, 3", True),  # 3, 5, 7
    (
        "math500-99",  # \begin{pmatrix} -1/3 \\ 2/3 \\ 5/3 \end{pmatrix}
        "\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\\\ \\frac{5}{3} \\end{pmatrix}",
        True,
    ),
    ("math500-184", "(2, \\infty)", True),  # (2,\infty)
    ("math500-435", "(-\\infty,2)\\cup(3,\\infty)", True),
    ("math500-454", "y=2x+3", True),  # y = 2x + 3
    ("math500-472", "137.5", True),  # 137 \frac{1}{2}
    ("math500-11", "3/56", True),  # \frac{3}{56}
    ("math500-8", "\\sqrt{117}", True),  # 3\sqrt{13}
    ("math500-31", "11\\sqrt{2}", True),  # 11\sqrt2
    ("math500-176", "0.0000672", True),  # .0000672
    ("aime24-0", "540", True),
    ("aime24-0", "540.0", True),
    ("amc23-0", "27", True),
    ("minerva-1", "4.5 \\times 10^{33}", True),  # 4.5e33
    ("minerva-1", "4.5\\cdot10^{33}", True),
    ("minerva-38", "-1/3", True),  # -1./3
    ("minerva-38", "-\\frac{1}{3}", True),
    ("minerva-44", "10^{-5}", True),  # 1e-5
    ("minerva-44", "0.00001", True),
    ("minerva-5", "\\arcsin(10/13)", True),  # np.arcsin(10/13)
    ("minerva-264", "2.88 \\times 10^{-19}", True),  # 2.88e-19
    ("minerva-0", "1.60", True),  # 1.6
    # near misses: must be wrong
    ("math500-219", "\\frac{1}{3}", False),
    ("math500-219", "0.05", False),
    ("math500-219", "2", False),
    ("math500-0", "(3, \\pi/3)", False),
    ("math500-0", "(\\pi/2, 3)", False),
    ("math500-0", "3", False),
    ("math500-7", "45^\\circ", False),
    ("math500-7", "9", False),
    ("math500-166", "\\frac{270}{17}", False),
    ("math500-257", "86.4", False),
    ("math500-198", "1008", False),
    ("math500-242", "32,349", False),
    ("math500-23", "-5", False),
    ("math500-23", "x=-5", False),
    ("math500-4", "Emily", False),
    ("math500-97", "west", False),
    ("math500-227", "D", False),
    ("math500-96", "1+\\sqrt{19}", False),
    ("math500-25", "1, 2", False),
    ("math500-36", "3, 5", False),
    ("math500-184", "[2, \\infty)", False),
    ("math500-293", "\\left[\\frac{3}{5},\\frac{8}{3}\\right]", False),  # open/closed end
    ("math500-454", "y=2x-3", False),
    ("math500-472", "137", False),
    ("math500-8", "3\\sqrt{3}", False),
    ("math500-2", "4.67", False),  # \frac{14}{3}: rounded is not equal
    ("math500-1", "q - p", False),  # p - q
    ("aime24-0", "541", False),
    ("aime24-0", "54", False),
    ("aime24-0", "5400", False),
    ("minerva-1", "4.5e32", False),
    ("minerva-1", "4.6 \\times 10^{33}", False),
    ("minerva-1", "4.5", False),
    ("minerva-38", "1/3", False),
    ("minerva-44", "10^{-4}", False),
    ("minerva-264", "1.325e-27", False),
    ("minerva-0", "16", False),
]


@pytest.mark.parametrize(("row", "candidate", "expected"), TABLE)
def test_grading_table(row: str, candidate: str, expected: bool) -> None:
    reference = REFS[row]
    response = f"Let me think step by step. ... Therefore the answer is \\boxed{{{candidate}}}."
    assert grade_math(response, reference) is expected, (reference, candidate)


def test_pool_agrees_with_in_process_grading_on_the_table() -> None:
    tasks = [GradeTask(f"\\boxed{{{cand}}}", REFS[row]) for row, cand, _ in TABLE]
    with GradingPool(workers=2, timeout=10) as pool:
        verdicts = pool.grade(tasks)
    assert [v.correct for v in verdicts] == [expected for _, _, expected in TABLE]
    assert not any(v.timed_out for v in verdicts)


def test_pool_kills_a_hung_comparison_and_keeps_going() -> None:
    # sympy evaluates 2^(2^32) exactly: a C-level big-integer power no alarm interrupts
    tasks = [
        GradeTask("\\boxed{2^{2^{2^{5}}}}", "3"),
        GradeTask("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}"),
        GradeTask("no boxed answer here", "3"),
        GradeTask("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}"),  # deduplicated
    ]
    start = time.monotonic()
    with GradingPool(workers=1, timeout=1, grace=0.5) as pool:
        verdicts = pool.grade(tasks)
        assert pool.killed == 1
        # the replacement worker still grades
        assert pool.grade([GradeTask("\\boxed{2\\pi}", "\\pi \\cdot 2")])[0].correct
    assert time.monotonic() - start < 30
    assert verdicts == [
        Verdict("2^{2^{2^{5}}}", False, timed_out=True),
        Verdict("\\sqrt{2}/2", True),
        Verdict(None, False),
        Verdict("\\sqrt{2}/2", True),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{5}.", "5"),
        ("first \\boxed{3} then \\boxed{4}", "4"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{\\{1\\pm\\sqrt{5},-2\\}}", "\\{1\\pm\\sqrt{5},-2\\}"),
        ("\\boxed{a^{b^{c}}} done", "a^{b^{c}}"),
        ("\\fbox{12}", "12"),
        ("\\boxed{1} and later \\fbox{2}", "2"),
        ("\\fbox{1} and later \\boxed{2}", "2"),
        ("$\\boxed 7$", "7"),
        ("\\boxed{ 42 }", "42"),
        ("\\boxed{2} then \\boxed{unclosed", "2"),
        ("\\boxed{unclosed", None),
        ("no box at all", None),
        ("\\boxedfoo{3}", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "n_choices", "expected"),
    [
        ("The answer is (C).", 4, "C"),
        ("Answer: B", 4, "B"),
        ("Answer: **D**", 4, "D"),
        ("the correct answer is option A", 4, "A"),
        ("Thus \\boxed{C}", 4, "C"),
        ("Thus \\boxed{\\text{(B)}}", 4, "B"),
        ("(A) looks wrong, (B) too, so (D)", 4, "D"),
        ("The answer is (A). Wait, no: the answer is (C).", 4, "C"),
        ("B", 4, "B"),
        ("The answer is (H).", 10, "H"),
        ("The answer is (H).", 4, None),  # not an option of a 4-choice question
        ("I am not sure.", 4, None),
        ("A number like 5", 4, None),
    ],
)
def test_extract_choice(text: str, n_choices: int, expected: str | None) -> None:
    assert extract_choice(text, n_choices) == expected


def test_grade_choice() -> None:
    assert grade_choice("Therefore, the answer is (B).", "B")
    assert not grade_choice("Therefore, the answer is (B).", "C")
    assert not grade_choice("no letter", "A")
    assert grade("The answer is (J)", "J", "multiple-choice", n_choices=10).correct


def test_bare_answers_and_missing_answers() -> None:
    assert grade_math("540", "540")  # a bare answer (GRPO reference checks) passes through
    assert not grade_math("", "540")
    assert grade("no box, the answer is 3", "3") == Verdict(None, False)  # eval needs a box
    assert grade("3", "3", require_boxed=False) == Verdict("3", True)
    assert grade_math("x = 5", "5") and grade_math("\\text{Evelyn}", "\\text{Evelyn}")
    assert grade_math("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi/2)")
    # prose without a box is not an answer (GRPO rewards mean what eval accuracy means)
    assert not grade_math("so x = 5", "5")
    assert not grade_math("The answer is 5", "5")
    assert not grade_math("5\nso 5", "5")
    assert grade("\\boxed{}", "3") == Verdict(None, False)


def test_normalize_answer_examples() -> None:
    assert normalize_answer("\\left( 3, \\dfrac{\\pi}{2} \\right)") == "(3,\\frac{\\pi}{2})"
    assert normalize_answer("10,\\!080") == "10080"
    assert normalize_answer("864 \\mbox{ inches}^2") == "864"
    assert normalize_answer("\\text{(C)}") == "c"
    assert normalize_answer("11,\\! 111,\\! 111,\\! 100") == "11111111100"
    assert normalize_answer("1, 234") == "1,234"  # a pair, not a thousands separator
    assert normalize_answer("1,234") == "1234"


# issue 15: units inside \text{}, and the seed's "The answer is: X" ---------------------


@pytest.mark.parametrize(
    ("answer", "reference"),
    [
        ("\\text{27 miles}", "27"),  # the case: the unit inside the text
        ("\\text{27 miles per hour}", "27"),
        ("27 \\text{ miles per hour}", "27"),
        ("\\text{5 cm}^2", "5"),
        ("\\text{3 weeks}", "3"),
        ("\\text{12 centimeters}", "12"),
        ("\\text{2 days}", "2\\text{ days}"),
    ],
)
def test_units_inside_text_are_dropped(answer: str, reference: str) -> None:
    assert normalize_answer(answer) == normalize_answer(reference)
    assert grade(f"So the trip is \\boxed{{{answer}}}.", reference).correct


def test_boxed_text_with_units_grades_equal_in_the_pool_too() -> None:
    with GradingPool(workers=1) as pool:
        (verdict,) = pool.grade([GradeTask("\\boxed{\\text{27 miles}}", "27")])
    assert verdict == Verdict("\\text{27 miles}", True)


def test_words_that_are_not_units_after_a_number_stay() -> None:
    # only a unit after a number goes (the seed deletes unit words anywhere: "perimeter"
    # loses its "meter" there)
    assert normalize_answer("\\text{perimeter}") == "perimeter"
    assert normalize_answer("\\text{27 apples}") == "27apples"
    assert normalize_answer("\\text{Monday}") == "monday"


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("We multiply. The answer is: 27", "27"),  # the seed's own pattern
        ("So the answer is 27.", "27"),
        ("The answer is: 27 miles", "27 miles"),
        ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "\\frac{1}{2}"),
        ("Final Answer: The final answer is $27$. I hope it is correct.", "27"),
        ("**Answer:** 27", "27"),
        ("**Final Answer**: $27$", "27"),
        ("The answer is **27**.", "27"),
        ("The answer is 2.5.", "2.5"),
        ("The answer is: 27. That was easy.", "27"),
        ("Final answer:\n\n$42$", "42"),
        ("answer: 3 at first, but the answer is 4", "4"),  # the last phrase counts
        ("The answer is \\(x+1\\) indeed", "x+1"),
        ("No phrase here, just 27", None),
        ("the answers: 5", None),
    ],
)
def test_extract_answer_phrase(response: str, expected: str | None) -> None:
    assert extract_answer_phrase(response) == expected


def test_answer_phrase_is_graded_only_when_asked_and_only_without_a_box() -> None:
    response = "Each hour covers 9 miles, so in 3 hours... The answer is: 27 miles"
    assert grade(response, "27") == Verdict(None, False)  # off (the default): no answer
    assert grade(response, "27", answer_phrase=True) == Verdict("27 miles", True)
    # a boxed answer always wins over a phrase: one answer per response
    boxed = "The answer is: 27 but \\boxed{26}"
    assert grade(boxed, "27", answer_phrase=True) == Verdict("26", False)
    # an unclosed box is no boxed answer: the phrase is graded
    assert grade("\\boxed{27 The answer is: 27", "27", answer_phrase=True).correct
    assert not grade("I think it is 27", "27", answer_phrase=True).correct
    # GRPO rewards are unchanged: grade_math never reads phrases
    assert not grade_math("The answer is: 27 miles", "27")
    # multiple choice keeps its own phrase reading
    assert grade("The answer is (B)", "B", "multiple-choice", answer_phrase=True).correct


def test_pool_passes_the_answer_phrase_option() -> None:
    tasks = [
        GradeTask("The answer is: $\\frac{1}{2}$.", "0.5", answer_phrase=True),
        GradeTask("The answer is: $\\frac{1}{2}$.", "0.5"),
    ]
    with GradingPool(workers=1) as pool:
        on, off = pool.grade(tasks)
    assert on == Verdict("\\frac{1}{2}", True)
    assert off == Verdict(None, False)

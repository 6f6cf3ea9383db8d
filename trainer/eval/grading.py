"""Grading of model responses: boxed math answers and multiple-choice letters.

Math answers are taken from the last `\\boxed{...}` (or `\\fbox{...}`) of a response (or,
with the eval option `acceptAnswerPhrase`, from its last "The answer is: X" phrase when it
has no boxed answer) and compared with the reference by, in order: a normalised string
comparison (cheap, covers text answers, units such as `\\text{27 miles}` and formatting
variants), a numeric comparison when both sides are plain numbers, and math-verify's
symbolic comparison (sympy). docs/eval.md lists where this differs from the seed's grader
(one answer per response; no unanchored last-number fallback; units only after a number).

Sympy can hang on adversarial input, so bulk grading goes through `GradingPool`: worker
processes with a per-answer timeout that kills and replaces a stuck worker. A timed-out
answer counts as wrong.

GRPO rewards reuse `grade_math` / `GradingPool`; this module imports nothing heavy at
import time (math-verify and sympy load on first symbolic comparison).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Literal

AnswerKind = Literal["math", "multiple-choice"]
LETTERS = "ABCDEFGHIJKLMNOP"
DEFAULT_TIMEOUT = 5.0

# ---------------------------------------------------------------------------------------
# extraction


_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` (nested braces kept), else None.

    Also accepts the brace-less form `\\boxed 5` (one token). An unclosed box is ignored.
    """
    best: tuple[int, str] | None = None
    for command in _BOX_COMMANDS:
        start = text.rfind(command)
        while start != -1:
            content = _box_content(text, start + len(command))
            if content is not None:
                if best is None or start > best[0]:
                    best = (start, content)
                break
            start = text.rfind(command, 0, start)
    return None if best is None else best[1].strip()


def _box_content(text: str, pos: int) -> str | None:
    if pos < len(text) and text[pos].isalpha():
        return None  # \boxedfoo is a different command
    i = pos
    while i < len(text) and text[i] in " \t":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        if i == pos:
            return None
        match = re.match(r"[^\s$]+", text[i:])
        return match.group(0) if match else None
    depth = 0
    for j in range(i, len(text)):
        char = text[j]
        if char == "\\" and j + 1 < len(text) and text[j + 1] in "{}":
            continue
        if char == "{" and (j == 0 or text[j - 1] != "\\"):
            depth += 1
        elif char == "}" and (j == 0 or text[j - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


_ANSWER_PHRASE = re.compile(
    r"(?<![A-Za-z])answer(?![A-Za-z])[*_]*\s*(?:is(?![A-Za-z])\s*[*_]*\s*:?|:)[*_]*[ \t]*",
    re.IGNORECASE,
)
_MATH_SPANS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_PHRASE_MAX = 200


def extract_answer_phrase(text: str) -> str | None:
    """The answer stated in the last "answer is" phrase of a response, else None.

    Accepts "The answer is: X" (the seed's pattern), "The answer is X", "The final answer
    is $X$. I hope it is correct.", "Answer: X" and "**Final Answer:** X" (any case, with
    markdown emphasis). X runs to the end of its sentence (or is the next line when the
    phrase ends its line); a leading `$...$` or `\\(...\\)` span is taken alone. Longer
    than 200 characters is prose, not an answer: None.
    """
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if not phrases:
        return None
    found = phrases[-1]
    rest, _, after = text[found.end() :].partition("\n")
    if not rest.strip():
        rest = next((line for line in after.splitlines() if line.strip()), "")
    rest = re.sub(r"\.?\s*I hope it is correct\.?.*$", "", rest.strip(), flags=re.IGNORECASE)
    rest = rest.strip().strip("*_`").strip()
    for open_, close in _MATH_SPANS:
        if rest.startswith(open_):
            end = rest.find(close, len(open_))
            if end != -1:
                return rest[len(open_) : end].strip() or None
    rest = re.split(r"\.(?:\s|$)", rest, maxsplit=1)[0].strip().rstrip(".").strip("*_`").strip()
    if not rest or len(rest) > _PHRASE_MAX:
        return None
    return rest


def extract_choice(text: str, n_choices: int = 4) -> str | None:
    """The option letter a multiple-choice response settles on, else None.

    Looks, in order, at the last `\\boxed{...}`, the last "answer is (X)" / "Answer: X"
    phrase, the last parenthesised letter "(X)", and a response that is just a letter.
    Only letters among the first `n_choices` count.
    """
    valid = LETTERS[: max(1, min(n_choices, len(LETTERS)))]
    boxed = extract_boxed(text)
    if boxed is not None:
        letter = _bare_letter(boxed, valid)
        if letter:
            return letter
    phrase = re.compile(
        r"answer\s*(?:is|:)?\s*(?:option|choice)?\s*[:=]?\s*[*_`$]*\s*"
        r"(?:\\text\{)?\(?([A-P])\)?(?![A-Za-z])",
        re.IGNORECASE,
    )
    found = [m.group(1) for m in phrase.finditer(text) if m.group(1) in valid]
    if found:
        return found[-1]
    found = [m.group(1) for m in re.finditer(r"\(([A-P])\)", text) if m.group(1) in valid]
    if found:
        return found[-1]
    return _bare_letter(text, valid)


def _bare_letter(text: str, valid: str) -> str | None:
    stripped = re.sub(r"\\text(?:bf)?\{([^{}]*)\}", r"\1", text).strip().strip("*$`. ")
    match = re.fullmatch(r"\(?([A-P])\)?[.:)]?", stripped)
    if match and match.group(1) in valid:
        return match.group(1)
    return None


# ---------------------------------------------------------------------------------------
# normalisation


_UNIT_WORDS = (
    r"degrees?|cents?|dollars?|inches|inch|feet|foot|ft|meters?|centimeters?|millimeters?|"
    r"kilometers?|cm|mm|km|m|units?|square\s+\w+|sq\s*\w+|hours?|minutes?|seconds?|days?|"
    r"weeks?|months?|years?|miles?|mph|pounds?|grams?|kg|g|mi|yards?|liters?|ml|percent|"
    r"points?|people|students?"
)
_UNITS = rf"(?:{_UNIT_WORDS})(?:\s+per\s+(?:{_UNIT_WORDS}))?"
"""A unit such as `miles` or `miles per hour`."""


def normalize_answer(answer: str) -> str:
    """A canonical string form of an answer for exact comparison (not a parser)."""
    s = answer.strip()
    s = re.sub(r"^\$+|\$+$", "", s).strip()
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s).strip()
    s = re.sub(r"(?<=\d),\\!\s*(?=\d{3}(?!\d))", "", s)  # 10,\!080: a thousands separator
    s = re.sub(r"\\(?:left|right|big|Big|bigl|bigr|Bigl|Bigr)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[,;:! ]", "", s).replace("~", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s).replace("°", "")
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "")
    s = re.sub(r"^np\.(?=[a-z])", r"\\", s)
    # trailing units such as "\text{ cm}^2", "\mbox{ inches}^2", "5.4 cents", and units
    # inside the text with the number, "\text{27 miles}" (unwrapped first)
    s = re.sub(
        rf"(?<=[\d}}\s])\s*\\(?:text|mbox|mathrm)\{{\s*{_UNITS}\s*\}}(\^\{{?\d\}}?)?$",
        "",
        s,
    )
    s = re.sub(r"\\(?:text|textbf|textrm|mbox|mathrm|mathbf|operatorname)\{([^{}]*)\}", r"\1", s)
    s = re.sub(rf"(?<=\d)\s+{_UNITS}(\^\{{?\d\}}?)?\s*$", "", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\w)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)
    s = re.sub(r"([_^])\{(\w)\}", r"\1\2", s)
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s.strip()):
        s = s.replace(",", "")  # 10,080 (but "1, 234" stays a pair)
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"^[a-zA-Z]=(?!=)", "", s)  # "x=5" -> "5"
    s = re.sub(r"(\d)\.(?!\d)", r"\1", s)  # "1." -> "1"
    s = s.rstrip(".")
    s = re.sub(r"^\(([A-Za-z])\)$", r"\1", s)
    if re.fullmatch(r"[A-Za-z]+", s):
        s = s.lower()
    return s


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _as_number(normalized: str) -> float | None:
    text = normalized
    match = re.fullmatch(r"([-+]?(?:\d+\.?\d*|\.\d+))\\times10\^\{?([-+]?\d+)\}?", text)
    if match:
        text = f"{match.group(1)}e{match.group(2)}"
    if not _NUMBER.fullmatch(text):
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _latex_for_sympy(answer: str) -> str:
    """Rewrite forms math-verify misreads: `4.5e33` (it reads e as Euler's number)."""
    s = re.sub(
        r"(?<![\w.])(\d+(?:\.\d*)?|\.\d+)[eE]([-+]?\d+)(?![\w.])",
        r"\1\\times10^{\2}",
        answer,
    )
    s = re.sub(r"(\d)\.(?!\d)", r"\1", s)
    return re.sub(r"(?<![\w\\])np\.(?=[a-z])", r"\\", s)


# ---------------------------------------------------------------------------------------
# verdicts


@dataclass(frozen=True)
class Verdict:
    answer: str | None
    """What was extracted from the response (None: nothing gradable)."""
    correct: bool
    timed_out: bool = False
    """Symbolic comparison ran out of time (counted as wrong)."""


class _Timeout(Exception):
    pass


def answers_match(answer: str, reference: str, *, symbolic: bool = True) -> bool:
    """Whether an extracted answer equals the reference (no extraction, no timeout)."""
    a, r = normalize_answer(answer), normalize_answer(reference)
    if not a:
        return False
    if a == r:
        return True
    na, nr = _as_number(a), _as_number(r)
    if na is not None and nr is not None:
        return math.isclose(na, nr, rel_tol=1e-6)
    if not symbolic:
        return False
    return _math_verify_equal(answer, reference)


_MV_LOCK = threading.Lock()


def _math_verify_equal(answer: str, reference: str) -> bool:
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    gold = parse("\\boxed{" + _latex_for_sympy(reference) + "}", parsing_timeout=None)
    pred = parse("\\boxed{" + _latex_for_sympy(answer) + "}", parsing_timeout=None)
    if not gold or not pred:
        return False
    try:
        return bool(verify(gold, pred, timeout_seconds=None))
    except Exception:  # sympy raises all kinds of errors on odd input: not equal
        return False


def response_answer(
    response: str,
    kind: AnswerKind = "math",
    n_choices: int = 4,
    require_boxed: bool = True,
    answer_phrase: bool = False,
) -> str | None:
    """The gradable answer in a response: the option letter for multiple choice; for math
    the last boxed expression, else (with answer_phrase=True) the answer of the last
    "The answer is: X" phrase (`extract_answer_phrase`), else (with require_boxed=False)
    the whole text when it is a bare answer."""
    if kind == "multiple-choice":
        return extract_choice(response, n_choices)
    boxed = any(c in response for c in _BOX_COMMANDS)
    answer = extract_boxed(response) if boxed else None
    if answer:
        return answer
    if answer_phrase:
        phrase = extract_answer_phrase(response)
        if phrase:
            return phrase
    if require_boxed or boxed:
        return None
    stripped = response.strip()
    return stripped if looks_like_bare_answer(stripped) else None


def looks_like_bare_answer(text: str) -> bool:
    """An answer on its own (`540`, `x = 5`, `\\frac{1}{2}`, `\\text{east}`), not prose such
    as "so x = 5": one line with no word of two or more letters outside LaTeX commands."""
    if not text or "\n" in text or len(text) > 200:
        return False
    bare = re.sub(r"\\(?:text|textbf|mbox|mathrm|operatorname)\{[^{}]*\}", " ", text)
    bare = re.sub(r"\\[A-Za-z]+", " ", bare)
    return re.search(r"[A-Za-z]{2,}", bare) is None


def grade(
    response: str,
    reference: str,
    kind: AnswerKind = "math",
    *,
    n_choices: int = 4,
    timeout: float | None = DEFAULT_TIMEOUT,
    require_boxed: bool = True,
    answer_phrase: bool = False,
) -> Verdict:
    """Grade one response in this process.

    The timeout uses SIGALRM and so applies only on the main thread; elsewhere the
    comparison runs without one (use `GradingPool` for untrusted bulk input).
    """
    answer = response_answer(response, kind, n_choices, require_boxed, answer_phrase)
    if answer is None:
        return Verdict(None, False)
    if kind == "multiple-choice":
        letter = _bare_letter(reference, LETTERS) or reference.strip().upper()
        return Verdict(answer, answer == letter)
    try:
        with _alarm(timeout):
            return Verdict(answer, answers_match(answer, reference))
    except _Timeout:
        return Verdict(answer, False, timed_out=True)


def grade_math(response_or_answer: str, reference: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """True when the response's last boxed answer equals `reference`. Text without a box
    counts only when it is a bare answer (`looks_like_bare_answer`), never prose: a reward
    of 1 means what a correct sample means in evaluation."""
    return grade(response_or_answer, reference, timeout=timeout, require_boxed=False).correct


def grade_choice(response: str, reference_letter: str, n_choices: int = 4) -> bool:
    """True when the letter a response settles on is `reference_letter`."""
    return grade(response, reference_letter, "multiple-choice", n_choices=n_choices).correct


class _alarm:
    """Raise _Timeout in the main thread after `seconds` (no-op elsewhere or when None)."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.active = (
            seconds is not None
            and seconds > 0
            and threading.current_thread() is threading.main_thread()
            and hasattr(signal, "setitimer")
        )

    def __enter__(self) -> None:
        if self.active:
            self.previous = signal.signal(signal.SIGALRM, self._raise)
            signal.setitimer(signal.ITIMER_REAL, float(self.seconds))  # type: ignore[arg-type]

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise _Timeout


# ---------------------------------------------------------------------------------------
# process pool


@dataclass(frozen=True)
class GradeTask:
    response: str
    reference: str
    kind: AnswerKind = "math"
    n_choices: int = 4
    require_boxed: bool = True
    answer_phrase: bool = False
    """Math without a boxed answer: grade the "The answer is: X" phrase (eval option)."""


class GradingError(RuntimeError):
    """A grading worker could not start or died without an answer."""


def _serve(timeout: float) -> None:
    """Worker loop: one JSON [answer, reference] per stdin line -> [correct, timed_out]."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # anything a library prints must not corrupt the protocol
    import math_verify  # noqa: F401  (warm up while the parent prepares work)

    out.write("ready\n")
    for line in sys.stdin:
        answer, reference = json.loads(line)
        try:
            with _alarm(timeout):
                verdict = [answers_match(answer, reference), False]
        except _Timeout:
            verdict = [False, True]
        except Exception:
            verdict = [False, False]
        out.write(json.dumps(verdict) + "\n")


class _Worker:
    """One grading subprocess (`python -m psft.trainer.eval.grading --serve`)."""

    def __init__(self, timeout: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "psft.trainer.eval.grading", "--serve", str(timeout)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        self.stdout: Any = self.process.stdout
        self.ready = False
        self.job: tuple[str, str] | None = None
        self.started = time.monotonic()

    def send(self, job: tuple[str, str]) -> None:
        self.job = job
        self.started = time.monotonic()
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(list(job)) + "\n")
        self.process.stdin.flush()

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        elif self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.stdout is not None:
            self.stdout.close()


class GradingPool:
    """Worker processes that grade answers with a hard per-answer timeout.

    Extraction and the cheap comparisons happen in the calling process; only pairs that
    need sympy go to the workers, each distinct (answer, reference) pair once. Workers
    are plain subprocesses (no fork of a process holding torch threads, no re-import of
    the caller's main module). A worker that exceeds `timeout` (plus a short grace for
    its own alarm to fire) is killed and replaced, and its answer is graded wrong with
    `timed_out=True`.

        with GradingPool(workers=2, timeout=5) as pool:
            verdicts = pool.grade([GradeTask(response, "42"), ...])
    """

    startup_timeout = 120.0

    def __init__(
        self, workers: int | None = None, timeout: float = DEFAULT_TIMEOUT, grace: float = 2.0
    ) -> None:
        self.size = workers or max(1, min(4, os.cpu_count() or 1))
        self.timeout = timeout
        self.grace = grace
        self._workers: list[_Worker] = []
        self._cache: dict[tuple[str, str], tuple[bool, bool]] = {}
        self.killed = 0
        """Workers killed for exceeding the timeout (for logs and tests)."""

    def __enter__(self) -> GradingPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def grade(self, tasks: Iterable[GradeTask]) -> list[Verdict]:
        tasks = list(tasks)
        answers = [
            response_answer(t.response, t.kind, t.n_choices, t.require_boxed, t.answer_phrase)
            for t in tasks
        ]
        pending: dict[tuple[str, str], None] = {}
        for task, answer in zip(tasks, answers, strict=True):
            if answer is None or task.kind != "math":
                continue
            key = (answer, task.reference)
            if key in self._cache or key in pending:
                continue
            if answers_match(answer, task.reference, symbolic=False):
                self._cache[key] = (True, False)
            elif _both_numbers(answer, task.reference):
                self._cache[key] = (False, False)
            else:
                pending[key] = None
        if pending:
            self._run(list(pending))
        verdicts = []
        for task, answer in zip(tasks, answers, strict=True):
            if answer is None:
                verdicts.append(Verdict(None, False))
            elif task.kind == "multiple-choice":
                verdicts.append(
                    grade(task.response, task.reference, task.kind, n_choices=task.n_choices)
                )
            else:
                correct, timed_out = self._cache[(answer, task.reference)]
                verdicts.append(Verdict(answer, correct, timed_out))
        return verdicts

    def _run(self, jobs: list[tuple[str, str]]) -> None:
        queue = list(reversed(jobs))
        while len(self._workers) < min(self.size, len(jobs)):
            self._workers.append(_Worker(self.timeout))
        while queue or any(w.job is not None for w in self._workers):
            for worker in self._workers:
                if queue and worker.ready and worker.job is None:
                    worker.send(queue.pop())
            waiting = [w for w in self._workers if not w.ready or w.job is not None]
            ready = wait([w.stdout for w in waiting], timeout=self._next_deadline(waiting))
            for worker in waiting:
                if worker.stdout in ready:
                    self._receive(worker)
            now = time.monotonic()
            for worker in list(self._workers):
                if worker.job is not None and now - worker.started > self.timeout + self.grace:
                    self._cache[worker.job] = (False, True)
                    self.killed += 1
                    self._replace(worker)
                elif not worker.ready and now - worker.started > self.startup_timeout:
                    raise GradingError(f"a grading worker did not start in {self.startup_timeout}s")

    def _next_deadline(self, waiting: list[_Worker]) -> float:
        now = time.monotonic()
        limits = [
            w.started + (self.timeout + self.grace if w.ready else self.startup_timeout) - now
            for w in waiting
        ]
        return max(0.0, min(limits))

    def _receive(self, worker: _Worker) -> None:
        line = worker.stdout.readline()
        if not line:  # the worker died
            if not worker.ready:
                raise GradingError(
                    "a grading worker exited at start; run "
                    f"`{sys.executable} -m psft.trainer.eval.grading --serve 5` to see why"
                )
            assert worker.job is not None
            self._cache[worker.job] = (False, False)
            self._replace(worker)
        elif not worker.ready:
            worker.ready = True
        else:
            correct, timed_out = json.loads(line)
            assert worker.job is not None
            self._cache[worker.job] = (bool(correct), bool(timed_out))
            worker.job = None

    def _replace(self, worker: _Worker) -> None:
        worker.stop(kill=True)
        self._workers[self._workers.index(worker)] = _Worker(self.timeout)


def _both_numbers(answer: str, reference: str) -> bool:
    return (
        _as_number(normalize_answer(answer)) is not None
        and _as_number(normalize_answer(reference)) is not None
    )


def grade_all(
    tasks: Sequence[GradeTask], *, timeout: float = DEFAULT_TIMEOUT, workers: int | None = None
) -> list[Verdict]:
    """Grade many answers in a temporary `GradingPool`."""
    with GradingPool(workers=workers, timeout=timeout) as pool:
        return pool.grade(tasks)


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _serve(float(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_TIMEOUT)

"""Validation of PSFTJob documents: schema errors and cross-field rules, all at once.

Every message names the field path (camelCase, as the user wrote it) and what would be
valid, and shows an offending value cut short (psft.workflows.errors.shown). The operator
and `psft validate` call the same `validate_job`.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel, ValidationError

from psft.workflows.errors import MAX_SHOWN_VALUE, clipped, shown
from psft.workflows.models import context_length_of
from psft.workflows.paths import (
    PATH_FIELDS,
    STORAGE_LOCAL_PATH,
    path_value_problem,
    path_values,
)
from psft.workflows.spec import PSFTJob
from psft.workflows.spec_file import read_document


@dataclass(frozen=True)
class FieldError:
    path: str
    message: str

    def __str__(self) -> str:
        # a path holds a key the user wrote (an unknown field can be 100 KB long, or hold a
        # lone surrogate, which no terminal or file can take: it is shown escaped)
        path = clipped(self.path, MAX_SHOWN_VALUE)
        line = clipped(f"{path}: {self.message}" if path else self.message)
        return line.encode("utf-8", "backslashreplace").decode()


MAX_LISTED_ERRORS = 50
"""Errors an InvalidJob message lists; `errors` keeps them all."""


class InvalidJob(ValueError):
    """A PSFTJob that failed validation; `errors` holds every problem found."""

    def __init__(self, errors: list[FieldError], source: str = "") -> None:
        self.errors = errors
        self.source = source
        # the source is a file name or the operator's namespace/name: shown cut short, and
        # escaped where it holds no text (a file name of undecodable bytes)
        shown_source = clipped(source, MAX_SHOWN_VALUE).encode("utf-8", "backslashreplace")
        where = f"{shown_source.decode()}: " if source else ""
        lines = [f"  - {e}" for e in errors[:MAX_LISTED_ERRORS]]
        if len(errors) > MAX_LISTED_ERRORS:
            lines.append(f"  - … and {len(errors) - MAX_LISTED_ERRORS} more")
        super().__init__(f"{where}{len(errors)} error(s) in PSFTJob\n" + "\n".join(lines))


def _loc_to_path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"str", "CustomBenchmark"} or "[" in str(part):
            # pydantic's union-member tags, not user fields
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _leaves(annotation: Any) -> Iterable[tuple[Any, list[Any]]]:
    """(type, constraints) of each member of a union, Annotated unwrapped."""
    if typing.get_origin(annotation) is typing.Annotated:
        inner, *extra = typing.get_args(annotation)
        found = [m for e in extra for m in getattr(e, "metadata", [e])]
        for leaf, constraints in _leaves(inner):
            yield leaf, found + constraints
    elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            yield from _leaves(arg)
    else:
        yield annotation, []


def _maximum_at(loc: Iterable[Any]) -> int | float | None:
    """The upper bound of the field at a pydantic error location, None if unknown."""
    leaves = list(_leaves(PSFTJob))
    for part in loc:
        if isinstance(part, int):
            items = [typing.get_args(t) for t, _ in leaves if typing.get_origin(t) is list]
            leaves = [leaf for args in items for leaf in _leaves(args[0])]
            continue
        maps = [typing.get_args(t) for t, _ in leaves if typing.get_origin(t) is dict]
        if maps:  # `part` is a key of a map: its value's type
            leaves = [leaf for args in maps for leaf in _leaves(args[1])]
            continue
        models = [t for t, _ in leaves if isinstance(t, type) and issubclass(t, BaseModel)]
        if any(t.__name__ == part for t in models) or part in {"str", "int", "float"}:
            continue  # a union-member tag
        fields = {(i.alias or n): i for t in models for n, i in t.model_fields.items()}
        if part not in fields:
            return None
        info = fields[part]
        leaves = [(t, [*info.metadata, *c]) for t, c in _leaves(info.annotation)]
    for _, constraints in leaves:
        for c in constraints:
            if isinstance(c, annotated_types.Le):  # integer fields bound with le= only
                return c.le
    return None


def _looks_like_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def schema_errors(exc: ValidationError) -> list[FieldError]:
    """pydantic's errors as FieldErrors: wire paths, plain words, values cut short."""
    errors = []
    for err in exc.errors(include_url=False):
        path = _loc_to_path(err["loc"])
        if err["type"] == "extra_forbidden":
            msg = "unknown field; check the spelling (fields are camelCase, see docs/psftjob.md)"
        elif err["type"] == "missing":
            msg = "is required"
        elif err["type"] == "int_parsing_size" or (
            err["type"] == "int_parsing" and _looks_like_number(err.get("input"))
        ):
            # a number past int64 (JSON 1e30), or YAML's `1e30`, which YAML 1.1 reads as a
            # string (an exponent needs a '.'): pydantic's own messages speak of strings
            bound = _maximum_at(err["loc"])
            limit = f" at most {bound}" if bound is not None else ""
            msg = f"must be a whole number{limit}, written in digits (got {shown(err['input'])})"
        else:
            msg = err["msg"]
            if "input" in err and not isinstance(err["input"], dict | list):
                msg = f"{msg} (got {shown(err['input'])})"
        errors.append(FieldError(path, msg))
    return errors


Rule = Callable[[PSFTJob], Iterable[FieldError]]


def _batch_sizes(job: PSFTJob) -> Iterable[FieldError]:
    p = job.spec.psft
    if p.mini_batch_size > p.batch_size:
        yield FieldError(
            "spec.psft.miniBatchSize",
            f"({p.mini_batch_size}) must be at most spec.psft.batchSize ({p.batch_size})",
        )
    elif p.batch_size % p.mini_batch_size:
        yield FieldError(
            "spec.psft.miniBatchSize",
            f"({p.mini_batch_size}) must divide spec.psft.batchSize ({p.batch_size})",
        )
    if p.micro_batch_size > p.mini_batch_size:
        yield FieldError(
            "spec.psft.microBatchSize",
            f"({p.micro_batch_size}) must be at most spec.psft.miniBatchSize ({p.mini_batch_size})",
        )
    elif p.mini_batch_size % p.micro_batch_size:
        yield FieldError(
            "spec.psft.microBatchSize",
            f"({p.micro_batch_size}) must divide spec.psft.miniBatchSize ({p.mini_batch_size})",
        )
    longest = job.spec.dataset.max_prompt_length + job.spec.dataset.max_response_length
    if p.max_tokens_per_micro_batch is not None and p.max_tokens_per_micro_batch < longest:
        yield FieldError(
            "spec.psft.maxTokensPerMicroBatch",
            f"({p.max_tokens_per_micro_batch}) must hold the longest demonstration, "
            f"dataset.maxPromptLength + maxResponseLength = {longest}: raise it to {longest} "
            "or more",
        )
    g = job.spec.grpo
    if g.enabled and g.batch_size % g.mini_batch_size:
        yield FieldError(
            "spec.grpo.miniBatchSize",
            f"({g.mini_batch_size}) must divide spec.grpo.batchSize ({g.batch_size})",
        )


def _context_length(job: PSFTJob) -> Iterable[FieldError]:
    d = job.spec.dataset
    limit = job.spec.model.max_context_length or context_length_of(job.spec.model.source)
    if limit is not None and d.max_prompt_length + d.max_response_length > limit:
        yield FieldError(
            "spec.dataset.maxResponseLength",
            f"maxPromptLength ({d.max_prompt_length}) + maxResponseLength "
            f"({d.max_response_length}) = {d.max_prompt_length + d.max_response_length} "
            f"exceeds the model's context length ({limit}); lower one of them",
        )


def _storage(job: PSFTJob) -> Iterable[FieldError]:
    s = job.spec.storage
    if s.type == "s3" and s.s3 is None:
        yield FieldError("spec.storage.s3", "is required when spec.storage.type is 's3'")


def _grpo(job: PSFTJob) -> Iterable[FieldError]:
    g = job.spec.grpo
    if g.enabled and not g.prompts:
        yield FieldError(
            "spec.grpo.prompts",
            "is required when spec.grpo.enabled is true: files of prompts with answers",
        )


def _resources(job: PSFTJob) -> Iterable[FieldError]:
    """Multi-node training (a KubeRay RayJob driving verl's Ray trainer, see
    psft.trainer.verl.ray_trainer) needs the verl engine and gpusPerNode workers per node
    (on `device: cpu`, one worker per node). The CRD has both as CEL rules."""
    r = job.spec.resources
    if r.nodes > 1 and job.spec.psft.engine == "native":
        yield FieldError(
            "spec.psft.engine",
            f"'native' runs on one node; resources.nodes is {r.nodes}: use 'verl' or 'auto'",
        )
    if r.nodes > 1 and r.gpus_per_node == 0:
        yield FieldError("spec.resources.gpusPerNode", "must be > 0 for multi-node training")


def _tolerations(job: PSFTJob) -> Iterable[FieldError]:
    """Kubernetes' rules for a Pod's tolerations (the CRD has them as CEL rules,
    psft.workflows.formats.TOLERATION_RULES): a Pod that breaks one cannot be created."""
    for i, t in enumerate(job.spec.resources.tolerations):
        where = f"spec.resources.tolerations[{i}]"
        if not t.key and t.operator != "Exists":
            yield FieldError(
                f"{where}.operator",
                "must be Exists when key is empty (such a toleration matches every taint); "
                "name the taint's key, or set operator: Exists",
            )
        if t.value and t.operator == "Exists":
            yield FieldError(
                f"{where}.value",
                f"must be empty when operator is Exists (got {shown(t.value)}); drop it, or "
                "set operator: Equal",
            )
        if t.toleration_seconds is not None and t.effect != "NoExecute":
            yield FieldError(
                f"{where}.effect",
                "must be NoExecute when tolerationSeconds is set (it says how long a pod stays "
                "on a node once such a taint appears)",
            )


def _eval(job: PSFTJob) -> Iterable[FieldError]:
    from psft.workflows.benchmarks import REGISTERED_BENCHMARKS

    seen: set[str] = set()
    for i, b in enumerate(job.spec.eval.benchmarks):
        name = b if isinstance(b, str) else b.name
        if isinstance(b, str) and b not in REGISTERED_BENCHMARKS:
            yield FieldError(
                f"spec.eval.benchmarks[{i}]",
                f"unknown benchmark {shown(b)}; registered: "
                f"{', '.join(sorted(REGISTERED_BENCHMARKS))}"
                " (or give {name, path, type} for a custom file)",
            )
        if name in seen:
            yield FieldError(
                f"spec.eval.benchmarks[{i}]", f"benchmark {shown(name)} is listed twice"
            )
        seen.add(name)
    for name in job.spec.eval.samples_per_benchmark:
        if name not in seen:
            yield FieldError(
                f"spec.eval.samplesPerBenchmark.{name}",
                f"names no benchmark of eval.benchmarks ({', '.join(sorted(seen)) or 'none'}); "
                "use one of those names",
            )


def _paths(job: PSFTJob) -> Iterable[FieldError]:
    """Every local path a field holds names one (psft.workflows.paths resolves them)."""
    fields = tuple(f for f in PATH_FIELDS if f != STORAGE_LOCAL_PATH)  # checked before parsing
    for item in path_values({"spec": job.spec.to_wire()}, fields):
        problem = path_value_problem(item)
        if problem:
            yield FieldError(item.where, problem)


def _compare(job: PSFTJob) -> Iterable[FieldError]:
    spec = job.spec
    if not spec.compare.enabled:
        return
    if spec.psft.objective != "psft":
        yield FieldError(
            "spec.compare.enabled",
            "compares a PSFT arm with an SFT arm, so psft.objective must be 'psft' "
            f"(it is '{spec.psft.objective}'): set psft.objective: psft",
        )
    if spec.engine != "native":
        yield FieldError(
            "spec.compare.enabled",
            "runs its arms on the native engine (one node); psft.engine resolves to "
            f"'{spec.engine}' (psft.engine '{spec.psft.engine}', resources.nodes "
            f"{spec.resources.nodes}, gpusPerNode {spec.resources.gpus_per_node}): set "
            "psft.engine: native and resources.nodes: 1, or run the SFT baseline as a second "
            "PSFTJob",
        )


RULES: list[Rule] = [
    _compare,
    _batch_sizes,
    _context_length,
    _storage,
    _grpo,
    _resources,
    _tolerations,
    _eval,
    _paths,
]


def _not_utf8(data: Any, where: str = "") -> Iterable[FieldError]:
    """Strings (keys and values) holding a lone UTF-16 surrogate such as `\\ud800`: no
    character at all, yet YAML and JSON escapes produce one. Such a string passes every
    `str` field and then cannot be written as UTF-8 (stage.json, the Workflow)."""
    stack = [(data, where)]
    while stack:
        node, here = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                path = f"{here}.{key}" if here else str(key)
                if isinstance(key, str) and not _encodable(key):
                    yield FieldError(path, f"this key {_SURROGATE_PROBLEM}")
                stack.append((value, path))
        elif isinstance(node, list):
            stack.extend((value, f"{here}[{i}]") for i, value in enumerate(node))
        elif isinstance(node, str) and not _encodable(node):
            yield FieldError(here, f"{_SURROGATE_PROBLEM} (got {shown(node)})")


_SURROGATE_PROBLEM = (
    "holds a lone UTF-16 surrogate (an escape such as \\ud800 without its pair), which is no "
    "character and cannot be written as UTF-8; write the character itself"
)


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def validate_job(data: dict[str, Any], source: str = "") -> PSFTJob:
    """Parse and check a PSFTJob document; raise InvalidJob listing every error."""
    if not isinstance(data, dict):
        raise InvalidJob([FieldError("", "a PSFTJob must be a YAML mapping")], source)
    errors = list(_not_utf8(data))
    try:
        job = PSFTJob.model_validate(data)
    except ValidationError as exc:
        raise InvalidJob(errors + schema_errors(exc), source) from None
    errors += [e for rule in RULES for e in rule(job)]
    if errors:
        raise InvalidJob(errors, source)
    return job


def load_job(path: str | Path) -> PSFTJob:
    """Read and validate a PSFTJob YAML or JSON file.

    SpecFileError when the file itself is the problem, InvalidJob when its fields are. The
    `status` of a file is ignored: only the operator writes it, on the cluster."""
    data = read_document(path)
    if isinstance(data, dict):
        data.pop("status", None)
    return validate_job(data, str(path))

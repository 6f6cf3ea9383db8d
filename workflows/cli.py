"""`psft`: one command line for local runs, stage entry points, and the operator.

Stage commands (`psft prepare|train|eval|grpo|report --config stage.json`) are the same
argv locally and in a pod. Heavy modules are imported only by the command that needs them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from psft.workflows.errors import UserError
from psft.workflows.spec_file import SpecFileError
from psft.workflows.validate import InvalidJob, load_job

STAGE_MODULES = {
    "prepare": "psft.trainer.prepare",
    "train": "psft.trainer.train",
    "eval": "psft.trainer.eval.stage",
    "grpo": "psft.trainer.grpo.stage",
    "report": "psft.trainer.report",
}


def _cmd_validate(args: argparse.Namespace) -> int:
    """Every file is checked; exit 2 if a file itself is the problem, else 1 on field errors."""
    worst = 0
    for path in args.files:
        try:
            job = load_job(path)
        except SpecFileError as exc:
            print(f"psft validate: error: {exc}", file=sys.stderr)
            worst = 2
        except InvalidJob as exc:
            print(exc, file=sys.stderr)
            worst = max(worst, 1)
        else:
            print(f"{path}: valid PSFTJob {job.metadata.name!r}")
    return worst


def _cmd_stage(args: argparse.Namespace) -> int:
    from psft.workflows.stages import read_stage_config

    config = read_stage_config(args.config)
    if config.kind != args.command:
        raise UserError(
            f"{args.config} is a {config.kind!r} stage config, not {args.command!r}: run "
            f"`psft {config.kind} --config {args.config}`, or give the {args.command} stage's "
            "config"
        )
    module = importlib.import_module(STAGE_MODULES[args.command])
    module.run(config)
    return 0


def _cmd_rayjob(args: argparse.Namespace) -> int:
    from psft.trainer import rayjob
    from psft.workflows.stages import read_stage_config

    rayjob.run(read_stage_config(args.config))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from psft.workflows.local import run_local

    job = load_job(args.file)
    return run_local(
        job,
        runs_dir=args.runs_dir,
        only=args.only,
        fresh=args.fresh,
        progress=not args.no_progress,
    )


def _cmd_models(args: argparse.Namespace) -> int:
    from psft.workflows.models import REGISTERED_MODELS

    for m in REGISTERED_MODELS.values():
        print(f"{m.name:28} {m.description}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from psft.trainer.eval.standalone import evaluate

    return evaluate(args)


def _cmd_crd(args: argparse.Namespace) -> int:
    from psft.workflows.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def _cmd_docs(args: argparse.Namespace) -> int:
    from psft.workflows.reference import reference_markdown

    sys.stdout.write(reference_markdown())
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from psft.workflows.argo import workflow_yaml

    sys.stdout.write(workflow_yaml(load_job(args.file)))
    return 0


def _cmd_operator(args: argparse.Namespace) -> int:
    main = importlib.import_module("psft.operator.main")
    return int(main.run_operator(args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a PSFTJob on this machine (all stages, local processes)")
    p.add_argument("file", help="PSFTJob YAML")
    p.add_argument("--runs-dir", help="override spec.storage.local.path")
    p.add_argument("--only", nargs="+", metavar="STAGE", help="run only these stages")
    p.add_argument("--fresh", action="store_true", help="discard an earlier run of this job")
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no live bar")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("validate", help="check PSFTJob files; print every error")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_cmd_validate)

    for name in STAGE_MODULES:
        p = sub.add_parser(name, help=f"run the {name} stage from a stage config")
        p.add_argument("--config", required=True, help="stage.json written by an executor")
        p.set_defaults(func=_cmd_stage)

    p = sub.add_parser(
        "rayjob", help="run a train stage config as a KubeRay RayJob and wait (multi-node step)"
    )
    p.add_argument("--config", required=True, help="stage.json of the train stage")
    p.set_defaults(func=_cmd_rayjob)

    p = sub.add_parser("models", help="list registered model names")
    p.set_defaults(func=_cmd_models)

    from psft.trainer.eval.standalone import add_arguments as add_evaluate_arguments

    p = sub.add_parser("evaluate", help="evaluate a model folder or registered model")
    add_evaluate_arguments(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("crd", help="print the PSFTJob CustomResourceDefinition (YAML)")
    p.set_defaults(func=_cmd_crd)

    p = sub.add_parser("docs", help="print the PSFTJob field reference (Markdown)")
    p.set_defaults(func=_cmd_docs)

    p = sub.add_parser("render", help="print the Argo Workflow a PSFTJob runs as (YAML)")
    p.add_argument("file", help="PSFTJob YAML")
    p.set_defaults(func=_cmd_render)

    p = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    p.add_argument("--namespace", action="append", help="watch only these namespaces")
    p.add_argument("--all-namespaces", action="store_true", help="cluster-wide")
    p.add_argument("--metrics-port", type=int, default=8080)
    p.add_argument("--health-port", type=int, default=8081)
    p.add_argument(
        "--bind-address", default="0.0.0.0", help="address of the metrics and health servers"
    )
    p.add_argument("--peering", default=None, help="kopf peering name (leader election)")
    p.add_argument("--standalone", action="store_true", help="no peering")
    p.set_defaults(func=_cmd_operator)
    return parser


TERMINATION_LOG = "/dev/termination-log"
"""Where Kubernetes reads a container's termination message (terminationMessagePath's
default); Argo shows it as the step's message, and the operator copies that into the
PSFTJob status. PSFT_TERMINATION_LOG overrides it (tests)."""
TERMINATION_MESSAGE_MAX = 4096  # bytes the kubelet keeps


def write_termination_message(message: str) -> None:
    """The one-line error of a failed stage, for `kubectl get psft` and Argo's UI: written
    only inside a container (the file exists there), never created elsewhere."""
    path = Path(os.environ.get("PSFT_TERMINATION_LOG", TERMINATION_LOG))
    if not path.is_file():
        return
    data = message.encode("utf-8", "replace")[:TERMINATION_MESSAGE_MAX]
    try:
        with path.open("wb") as f:
            f.write(data)
    except OSError:
        pass  # the message is on stderr too; never mask the stage's own error


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except InvalidJob as exc:
        print(exc, file=sys.stderr)
        write_termination_message(f"psft {args.command}: {' '.join(str(exc).split())}")
        return 1
    except UserError as exc:
        message = f"psft {args.command}: error: {exc}"
        print(message, file=sys.stderr)
        write_termination_message(message)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug or a library's failure: its traceback follows on stderr
        text = " ".join(str(exc).split())
        write_termination_message(
            f"psft {args.command}: unexpected {type(exc).__name__}: {text} (the traceback is "
            "in the container's log)"
        )
        raise


if __name__ == "__main__":
    sys.exit(main())

"""``rlhf``: validate a pipeline, run it on this machine, or print the CRD.

    rlhf validate PIPELINE.yaml          exit 0 when valid; field-level messages and exit 2 when not
    rlhf run [PIPELINE.yaml] [--workdir DIR]
                                         run every stage locally (default: examples/demo.yaml)
    rlhf crd                             the CustomResourceDefinition generated from the spec
    rlhf operator [OPTIONS]              run the operator (kopf): every RLHFPipeline's stages as Jobs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from rlhf_api.phases import PipelinePhase
from rlhf_operator.loading import SpecError, load_pipeline
from rlhf_operator.plan import stages_to_run

EXIT_INVALID = 2
DEFAULT_PIPELINE = Path("examples/demo.yaml")


def _validate(args: argparse.Namespace, console: Console) -> int:
    doc = load_pipeline(args.pipeline)
    stages = [s.value for s in stages_to_run(doc.spec)]
    console.print(f"{args.pipeline}: valid RLHFPipeline '{doc.metadata.name}' (stages: {', '.join(stages) or 'none'})")
    return 0


def _run(args: argparse.Namespace, console: Console) -> int:
    from rlhf_operator.runner import LocalRunner, summary_table

    doc = load_pipeline(args.pipeline)  # before anything is written
    workdir = Path(args.workdir) if args.workdir else Path("runs") / doc.metadata.name
    runner = LocalRunner(doc, workdir, console)
    console.print(f"pipeline [bold]{doc.metadata.name}[/]: artifacts in {runner.root}")
    result = runner.run()
    console.print(summary_table(result))
    console.print(result.message)
    evaluation = result.reports.get("evaluate")  # type: ignore[call-overload]
    if evaluation is not None and evaluation.metrics:
        console.print(f"evaluation plot: {runner.configs[evaluation.stage].output_uri}/evaluation.png")
    return 0 if result.phase is PipelinePhase.SUCCEEDED else 1


def _crd(args: argparse.Namespace, console: Console) -> int:
    from rlhf_operator.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["operator"]:  # its own options (rlhf operator --help); needs the operator extra (kopf)
        from rlhf_operator.controller.main import main as operator_main

        return operator_main(argv[1:])
    parser = argparse.ArgumentParser(prog="rlhf", description="rlhf-operator command line")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check a pipeline file against the spec")
    p.add_argument("pipeline", type=Path)
    p.set_defaults(func=_validate)
    p = sub.add_parser("run", help="run a pipeline locally, each stage as a subprocess")
    p.add_argument("pipeline", type=Path, nargs="?", default=DEFAULT_PIPELINE)
    p.add_argument("--workdir", help="where configs, work files and (by default) artifacts go "
                                     "(default: runs/<pipeline name>)")
    p.set_defaults(func=_run)
    p = sub.add_parser("crd", help="print the RLHFPipeline CustomResourceDefinition")
    p.set_defaults(func=_crd)
    sub.add_parser("operator", help="run the operator (see rlhf operator --help)")
    args = parser.parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    try:
        return args.func(args, console)
    except SpecError as err:
        console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        return EXIT_INVALID
    except KeyboardInterrupt:
        console.print("interrupted: finished stages are kept; run the same command again to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())

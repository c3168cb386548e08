"""The `adaptermerge` command: run / validate a merge described by an AdapterMerge YAML file, print the
CRD, or run the operator. See docs/cli.md.

Imports stay light at module level (pydantic, PyYAML): the operator image has no torch, and `crd` /
`operator` must work there. The worker (torch) is imported only by `run`; `validate` reads the inputs
with numpy and never imports torch.

Exit codes (docs/cli.md): 0 done; 2 invalid input (the message names the field or path, nothing is
written); 3 merge written but evaluation below minRetention; 1 anything else.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from merge_worker.output.result import build_result, printable, write_result_file
from merge_worker.spec import AdapterMergeSpec, SpecError, parse_resource
from merge_worker.inputs.volumes import Volumes

if TYPE_CHECKING:
    from merge_worker.output.ownership import Owner

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def load_spec_file(path: Path) -> AdapterMergeSpec:
    """Reads an AdapterMerge YAML file; a YAML syntax error names the file, line and column.
    Aliases, nesting deeper than MAX_SPEC_DEPTH and NUL bytes are refused (merge_worker.inputs.spec_yaml)."""
    from merge_worker.inputs.spec_yaml import load_spec_document

    return parse_resource(load_spec_document(Path(path))).spec


def _installed_version() -> str:
    """The installed distribution's version (pyproject's), read from its metadata: no torch import."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adaptermerge")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaptermerge", description="Merge PEFT LoRA adapters in delta-W space.",
        epilog="exit codes: 0 done, 1 failure, 2 invalid input (nothing written), "
               "3 merge written but evaluation below minRetention",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_inputs(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", type=Path, help="an AdapterMerge YAML file")
        p.add_argument("--volume", action="append", default=[], metavar="CLAIM=DIR",
                       help="map a claim named in the spec to a local folder (repeatable)")
        p.add_argument("--owner", metavar="NAMESPACE/NAME/UID",
                       help="the resource the output belongs to (the operator passes it): its earlier output "
                            "is replaced without overwrite, another resource's never")

    run = commands.add_parser("run", help="run the merge a YAML file describes, on this machine")
    with_inputs(run)
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="auto: cuda when available (default)")
    run.add_argument("--result-file", type=Path, metavar="PATH",
                     help="write the JSON result summary here (a pod's /dev/termination-log)")
    run.set_defaults(handler=_run)

    validate = commands.add_parser("validate", help="check the spec and every input without writing")
    with_inputs(validate)
    validate.add_argument("--result-file", type=Path, metavar="PATH",
                          help="check that run could write its result summary here (nothing is written)")
    validate.set_defaults(handler=_validate)

    convert = commands.add_parser(
        "from-mergekit", help="print the AdapterMerge resource for a mergekit YAML of BASE+ADAPTER models",
        description="Translate a mergekit merge configuration whose models are LoRA adapters of its"
                    " base_model (BASE+ADAPTER) into an AdapterMerge resource on stdout; what cannot be"
                    " translated exactly is an error naming the mergekit field (exit 2).")
    convert.add_argument("file", type=Path, help="a mergekit YAML (merge_method, base_model, models, ...)")
    convert.add_argument("--claim", default="models", help="claim holding the base and adapters (spec.volume)")
    convert.add_argument("--root", type=Path, help="folder the claim mounts: absolute paths are made relative to it")
    convert.add_argument("--output", default="merged", help="output path inside the claim (default: merged)")
    convert.add_argument("--name", help="metadata.name (default: from the file name)")
    convert.add_argument("--format", default="merged-model", choices=["merged-model", "adapter"],
                         help="merged-model, as mergekit writes (default), or a LoRA adapter")
    convert.set_defaults(handler=_from_mergekit)

    crd = commands.add_parser("crd", help="print the CustomResourceDefinition")
    crd.set_defaults(handler=_crd)
    commands.add_parser("operator", help="run the operator (kopf options follow)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["operator"]:
        # Everything after `operator` is kopf's (e.g. --all-namespaces, --liveness URL), untouched.
        from adaptermerge_operator.cli import run_operator

        return run_operator(argv[1:])
    args = _parser().parse_args(argv)
    _quiet_optional_kernel_warnings()
    return args.handler(args)


def _quiet_optional_kernel_warnings() -> None:
    """bitsandbytes (imported with peft) warns on every CPU run that an optional hub-downloaded kernel
    is missing; we never use its CPU 4-bit path (quantized evaluation is CUDA only), so the line is noise."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _error(message: str) -> None:
    print(f"adaptermerge: error: {printable(message)}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> int:
    from merge_worker.output import termination

    previous_handlers = termination.install()
    try:
        return _run_and_report(args)
    finally:
        termination.restore(previous_handlers)


def _run_and_report(args: argparse.Namespace) -> int:
    started = time.monotonic()

    def report(exit_code: int, message: str, **details) -> int:
        if args.result_file:
            write_result_file(args.result_file, build_result(
                exit_code, message, seconds=time.monotonic() - started, **details))
        return exit_code

    if args.result_file:
        try:  # before anything else: an unwritable result file could not even report the error
            from merge_worker.inputs.validation import check_result_file

            check_result_file(args.result_file)
        except SpecError as exc:
            _error(str(exc))
            return EXIT_INVALID
    try:
        owner = _owner(args.owner)
        spec = load_spec_file(args.file)
        volumes = Volumes.from_args(args.volume)
        from merge_worker.storage.staging import staged

        with staged(spec, volumes, owner) as stage:  # s3:// sources downloaded, an s3:// output pushed
            if stage.spec.search is not None:
                from merge_worker.search.runner import run_search as run
            else:
                from merge_worker.run import run_merge as run
            outcome = run(stage.spec, stage.volumes, device=args.device, owner=owner, spec_file=args.file,
                          provenance=stage.provenance)
            stage.publish(outcome)
    except SpecError as exc:
        _error(str(exc))
        return report(EXIT_INVALID, str(exc), field=exc.field, reason=getattr(exc, "reason", None))
    except KeyboardInterrupt:
        # Interrupts raise only before the output is published (merge_worker/output/termination.py).
        _error("interrupted; nothing was written")
        return report(EXIT_FAILED, "interrupted; nothing was written")
    except Exception as exc:  # noqa: BLE001 - any other failure: exit 1 with the reason
        traceback.print_exc()
        message = f"merge failed: {type(exc).__name__}: {exc}"
        _error(message)
        return report(EXIT_FAILED, message)
    if args.result_file:
        write_result_file(args.result_file, outcome.result)
    return outcome.exit_code


def _owner(value: str | None) -> Owner | None:
    if value is None:
        return None
    from merge_worker.output.ownership import Owner

    return Owner.parse(value)


def _validate(args: argparse.Namespace) -> int:
    """The checks `run` makes before merging (the same function), without torch and writing nothing."""
    try:
        from merge_worker.inputs.validation import check_result_file, load_inputs

        if args.result_file:
            check_result_file(args.result_file)
        spec = load_spec_file(args.file)
        volumes = Volumes.from_args(args.volume)
        from merge_worker.storage.staging import staged

        owner = _owner(args.owner)
        with staged(spec, volumes, owner) as stage:  # s3:// sources are downloaded to a scratch folder and checked
            inputs = load_inputs(stage.spec, stage.volumes, owner=owner, spec_file=args.file)
    except SpecError as exc:
        _error(str(exc))
        return EXIT_INVALID
    print(f"{args.file}: valid: {len(inputs.adapters)} adapters, {len(inputs.plan)} modules, "
          f"method {spec.method}, output {spec.output.format} at {spec.output.uri or inputs.output_path}")
    return EXIT_OK


def _from_mergekit(args: argparse.Namespace) -> int:
    import re

    from merge_worker.from_mergekit import TranslationError, load_config, to_yaml, translate

    name = args.name or re.sub(r"[^a-z0-9-]+", "-", args.file.stem.lower()).strip("-") or "merge"
    try:
        resource, notes = translate(load_config(args.file), claim=args.claim, output=args.output, name=name,
                                    root=args.root, output_format=args.format)
    except TranslationError as exc:
        _error(f"{args.file}: {exc.field}: {exc.message}")
        return EXIT_INVALID
    for note in notes:
        print(f"adaptermerge: note: {note}", file=sys.stderr)
    sys.stdout.write(to_yaml(resource))
    return EXIT_OK


def _crd(args: argparse.Namespace) -> int:
    from merge_worker.crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

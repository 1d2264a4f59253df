"""The `labkit` command: small tasks around the course (`labkit --help`)."""

import argparse
import sys
from pathlib import Path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="labkit", description="LLM optimization course toolkit")
    sub = ap.add_subparsers(dest="command", required=True)
    nb = sub.add_parser("notebooks", help="regenerate notebooks/ (student copies) from solutions/")
    nb.add_argument("--check", action="store_true", help="only report stale copies; exit 1 if any")
    gr = sub.add_parser(
        "grading", help="write nbgrader's source notebooks (an assignment) from solutions/"
    )
    gr.add_argument(
        "course_dir", type=Path, help="nbgrader's course directory (created if missing)"
    )
    gr.add_argument(
        "notebooks", nargs="+", help="solution notebooks by name, e.g. 00_setup 05_batching"
    )
    gr.add_argument(
        "--assignment", default="course", help="the assignment's name (default: course)"
    )
    sub.add_parser(
        "train", help="retrain the course model (see python -m labkit.train --help)", add_help=False
    )
    sub.add_parser("info", help="versions, device and the course model")
    sub.add_parser(
        "serve", help="OpenAI-compatible server (see labkit serve --help)", add_help=False
    )
    args, rest = ap.parse_known_args(argv)

    if args.command == "notebooks":
        from .exercises import generate

        stale = generate(check=args.check)
        for name in stale:
            print(("stale: " if args.check else "wrote: ") + name)
        if args.check and stale:
            print("run `make notebooks` (labkit notebooks) to regenerate the student copies")
            return 1
        if not stale:
            print("student notebooks are up to date")
        return 0
    if args.command == "grading":
        from .grading import write_course

        for path in write_course(args.course_dir, args.notebooks, args.assignment):
            print(f"wrote: {path}")
        print(
            f"next, in {args.course_dir}: nbgrader generate_assignment {args.assignment} "
            "(see docs/workshop.md, 'Grading with nbgrader')"
        )
        return 0
    if args.command == "train":
        from .train import main as train_main

        return train_main(rest)
    if args.command == "serve":
        from .serve.cli import main as serve_main

        return serve_main(rest)
    if args.command == "info":
        from .env import environment_report

        print(environment_report())
        return 0


if __name__ == "__main__":
    sys.exit(main())

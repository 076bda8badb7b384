"""The `plateau` command line.

  plateau models list               embedded models and whether they are provisioned
  plateau models pull NAME          provision an embedded model (idempotent)
  plateau config check FILE         validate a Serve config's plateau-serve args without starting
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence


def _models_list(_: argparse.Namespace) -> int:
    from deployments.models import EMBEDDED, is_pulled, model_dir

    rows = [
        {"name": m.name, "pulled": is_pulled(m.name), "path": str(model_dir(m.name)), "description": m.description}
        for m in EMBEDDED.values()
    ]
    print(json.dumps(rows, indent=2))
    return 0


def _models_pull(ns: argparse.Namespace) -> int:
    from deployments.models import ModelNotFound, pull

    try:
        path = pull(ns.name)
    except ModelNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _config_check(ns: argparse.Namespace) -> int:
    import yaml

    from deployments.app import AppConfigError, parse_args

    path = Path(ns.file)
    if not path.is_file():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    doc = yaml.safe_load(path.read_text()) or {}
    apps = [a for a in doc.get("applications", []) if str(a.get("import_path", "")).startswith("deployments.app:")]
    if not apps:
        print(f"error: {path} has no application with import_path deployments.app:build_app", file=sys.stderr)
        return 2
    for app in apps:
        try:
            args = parse_args(app.get("args"))
        except AppConfigError as exc:
            print(f"{path}: application {app.get('name')!r}: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({"application": app.get("name"), "args": args.model_dump(mode="json")}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plateau", description="plateau-serve: pack vLLM replicas at the bandwidth plateau")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="embedded models").add_subparsers(dest="action", required=True)
    models.add_parser("list", help="list embedded models").set_defaults(func=_models_list)
    pull = models.add_parser("pull", help="provision an embedded model")
    pull.add_argument("name", help="embedded model name, e.g. smollm2-135m")
    pull.set_defaults(func=_models_pull)

    config = sub.add_parser("config", help="Serve config files").add_subparsers(dest="action", required=True)
    check = config.add_parser("check", help="validate the plateau-serve args of a Serve config")
    check.add_argument("file", help="path to config.yaml")
    check.set_defaults(func=_config_check)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    return int(ns.func(ns))


if __name__ == "__main__":
    sys.exit(main())

"""The README and docs/*.md name only things that exist: repository files, `plateau` subcommands
and their options, `make` targets, and (docs/configuration.md) config fields.

What counts, in inline code spans and fenced code blocks alike:
- a repository path: a whitespace-separated word that contains `/` and whose first component is a
  top-level folder of the repository (`deployments/app.py`, `bench/results/x.json`, `.ci/run`), or a
  bare `config*.yaml`, `*.md` or `*.toml` name or `Makefile` (files at the root; `my.yaml` is the
  user's). A `::test` or `:name`
  suffix is dropped; a glob (`*`) must match at least one file. Anything else is not a repository
  path: URLs, `~/...`, `$VARS/...`, `/tmp/...`, `<placeholders>`, other projects' sources
  (`vllm/...`, `ray/...`), files that commands write (`profile.json`).
- `plateau <subcommand> [<action>] [--option ...]` must parse with the CLI's own argparse parser.
- `make <target>` must be a target of the Makefile.
- the first column of every table headed `field` in docs/configuration.md: a field of the config's
  pydantic models, relative to the backticked path in the table's section heading (`models[]`,
  `retry`, `policy.refit`) or to the application args when the heading names none.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Optional

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]
CONFIG_DOC = ROOT / "docs" / "configuration.md"

_FENCE = re.compile(r"^ {0,3}```[^\n]*\n(.*?)^ {0,3}```", re.S | re.M)
_INLINE = re.compile(r"(`+)(.+?)\1", re.S)
_ROOT_FILE = re.compile(r"^config[\w.-]*\.yaml$|^[\w.-]+\.(?:md|toml)$|^Makefile$")
_PLATEAU = re.compile(r"(?:^|(?<=[\s/(;&|]))plateau[ \t]+([a-z-][^`\n|;&>#]*)")
_MAKE = re.compile(r"(?:^|(?<=[\s(;&|]))make[ \t]+([a-z][\w-]*)")
_OPTION = re.compile(r"(?<![\w-])--[a-z][\w-]*")


def code_of(text: str) -> list[str]:
    """The code a page shows: each fenced block's lines (comments after `#` dropped) and each inline span."""
    chunks = []
    for block in _FENCE.findall(text):
        chunks += [re.sub(r"(^|\s)#.*", "", line) for line in block.splitlines()]
    chunks += [m.group(2) for m in _INLINE.finditer(_FENCE.sub("", text))]
    return chunks


def top_level_dirs() -> set[str]:
    return {p.name for p in ROOT.iterdir() if p.is_dir() and (not p.name.startswith(".") or p.name == ".ci")}


def repo_paths(chunk: str, dirs: set[str]) -> list[str]:
    """The words of `chunk` that name repository files or folders (see the module docstring)."""
    found = []
    for word in chunk.split():
        word = word.strip("\"'()[],;.").split("::")[0]
        if ":" in word:  # `bench/vs_vllm.py:SHIPPED_ENV`, `deployments.app:build_app`, URLs
            head, _, _ = word.partition(":")
            if "//" in word or "/" not in head:
                continue
            word = head
        if any(c in word for c in "<>{}$~=|"):
            continue
        if "/" in word:
            if word.split("/")[0] in dirs:
                found.append(word.rstrip("/"))
        elif _ROOT_FILE.match(word):
            found.append(word)
    return found


def exists(path: str) -> bool:
    return any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()


def page_id(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_there_are_docs_pages_and_the_readme_links_them():
    assert DOCS, "docs/*.md is empty"
    readme = (ROOT / "README.md").read_text()
    unlinked = [page_id(p) for p in DOCS if f"({page_id(p)})" not in readme]
    assert not unlinked, f"the README links no {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_repository_path_a_page_names_exists(page: Path):
    dirs = top_level_dirs()
    named = {p for chunk in code_of(page.read_text()) for p in repo_paths(chunk, dirs)}
    assert named, f"{page_id(page)} names no repository path: is the rule still reading it?"
    missing = sorted(p for p in named if not exists(p))
    assert not missing, f"{page_id(page)} names files that are not in the repository: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_markdown_links_to_pages_stay_inside_the_repository(page: Path):
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        resolved = (page.parent / target.split("#")[0]).resolve()
        if not resolved.is_relative_to(ROOT) or not resolved.exists():
            bad.append(target)
    assert not bad, f"{page_id(page)} links outside the repository or to nothing: {bad}"


def _subparsers(parser: argparse.ArgumentParser) -> Optional[dict[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return None


def plateau_problem(parser: argparse.ArgumentParser, command: str) -> Optional[str]:
    """Why `plateau <command>` does not match the CLI's parser, or None."""
    words = command.split()
    node, path = parser, ["plateau"]
    while (choices := _subparsers(node)) is not None:
        if not words or words[0].startswith("-"):
            return f"`{' '.join(path)}` needs one of {sorted(choices)}"
        if words[0] not in choices:
            return f"`{' '.join(path)} {words[0]}`: no such subcommand (there are {sorted(choices)})"
        node = choices[words[0]]
        path.append(words.pop(0))
    known = {s for a in node._actions for s in a.option_strings}
    unknown = sorted(set(_OPTION.findall(" ".join(words))) - known)
    if unknown:
        return f"`{' '.join(path)}` has no option {unknown}"
    return None


def plateau_commands(text: str) -> list[str]:
    return [m.group(1).strip() for chunk in code_of(text) for m in _PLATEAU.finditer(chunk)]


def test_the_plateau_rule_reads_subcommands_actions_and_options():
    from deployments.cli import build_parser

    parser = build_parser()
    assert plateau_commands("run `.venv/bin/plateau stop --timeout 5` or\n```bash\nplateau models pull x  # y\n```") \
        == ["models pull x", "stop --timeout 5"]
    assert plateau_commands("`plateau-serve`, `name: plateau`, `\"plateau\"`, `plateau <model> repack`") == []
    assert plateau_problem(parser, "status --json") is None
    assert plateau_problem(parser, "models pull smollm2-135m") is None
    assert plateau_problem(parser, "profile x --enforce-eager/--no-enforce-eager") is None
    assert "no such subcommand" in plateau_problem(parser, "serve")
    assert "needs one of" in plateau_problem(parser, "models")
    assert "no option" in plateau_problem(parser, "status --jsn")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_plateau_command_a_page_names_exists(page: Path):
    from deployments.cli import build_parser

    parser = build_parser()
    problems = [p for c in plateau_commands(page.read_text()) if (p := plateau_problem(parser, c))]
    assert not problems, f"{page_id(page)}: " + "; ".join(problems)


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_make_target_a_page_names_exists(page: Path):
    targets = make_targets()
    assert {"run", "test"} <= targets
    named = {t for chunk in code_of(page.read_text()) for t in _MAKE.findall(chunk)}
    assert not named - targets, f"{page_id(page)} names make targets the Makefile lacks: {sorted(named - targets)}"


def _nested(annotation) -> Optional[type[BaseModel]]:
    """The pydantic model inside a field's annotation (`RetryPolicy`, `list[ModelConfig]`), if any."""
    stack = [annotation]
    while stack:
        a = stack.pop()
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
        stack += list(getattr(a, "__args__", ()))
    return None


def resolve_field(path: str, model: type[BaseModel]) -> Optional[str]:
    """Why the dotted config path (`models[].prompt_tokens`, `policy.*`) is not a field of `model`, or None."""
    parts = [p for p in path.replace("[]", "").split(".") if p]
    for i, part in enumerate(parts):
        if part == "*" and i == len(parts) - 1:
            return None
        field = model.model_fields.get(part)
        if field is None:
            return f"`{path}`: {model.__name__} has no field {part!r}"
        if i < len(parts) - 1:
            inner = _nested(field.annotation)
            if inner is None:
                return f"`{path}`: {part!r} has no fields"
            model = inner
    return None


def scope_model(heading: str, root: type[BaseModel]) -> type[BaseModel]:
    """The model a section's tables are about: its heading's first backticked config path, else `root`."""
    for span in re.findall(r"`([^`]+)`", heading):
        model = root
        for part in [p for p in span.replace("[]", "").split(".") if p]:
            field = model.model_fields.get(part)
            inner = _nested(field.annotation) if field else None
            if inner is None:
                break
            model = inner
        else:
            return model
    return root


def config_table_fields(text: str) -> list[tuple[str, str]]:
    """(section heading, first-column name) of every table whose first header cell is `field`."""
    rows, heading, in_table = [], "", False
    for line in text.splitlines():
        if line.startswith("#"):
            heading = line
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
        if cells is None:
            in_table = False
        elif cells[0] == "field":
            in_table = True
        elif in_table and not set(cells[0]) <= set("-: "):
            rows += [(heading, name) for name in re.findall(r"`([^`]+)`", cells[0])]
    return rows


def test_the_config_field_rule_reads_scopes_and_paths():
    from deployments.config import AppArgs

    text = ("## Args\n| field | x |\n|---|---|\n| `device` | a |\n| `models[].dtype`, `policy.*` | b |\n\n"
            "## `policy.refit`\n| field | x |\n|---|---|\n| `cooldown_s` | c |\n| `nope` | d |\n")
    rows = config_table_fields(text)
    assert [n for _, n in rows] == ["device", "models[].dtype", "policy.*", "cooldown_s", "nope"]
    problems = [p for h, n in rows if (p := resolve_field(n, scope_model(h, AppArgs)))]
    assert problems == ["`nope`: RefitConfig has no field 'nope'"]


def test_every_config_field_docs_configuration_names_exists():
    from deployments.config import AppArgs

    assert CONFIG_DOC.exists(), "docs/configuration.md is the config reference the README links"
    rows = config_table_fields(CONFIG_DOC.read_text())
    problems = [p for heading, name in rows if (p := resolve_field(name, scope_model(heading, AppArgs)))]
    assert rows, "docs/configuration.md has no table headed `field`: is the rule still reading it?"
    assert not problems, "docs/configuration.md: " + "; ".join(problems)
    top = {name for heading, name in rows if scope_model(heading, AppArgs) is AppArgs}
    assert set(AppArgs.model_fields) <= top, f"application args not in the reference: {set(AppArgs.model_fields) - top}"

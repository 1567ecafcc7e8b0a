"""Reads the shell blocks of README.md and docs/*.md and says which commands name what does not exist.

A newcomer runs README's two set-up commands (``make install``, ``source .venv/bin/activate``), then
pastes the blocks. So every command there must be one of:

* ``patchlife SUBCOMMAND`` (or ``.venv/bin/patchlife``): a subcommand of cli/main.py, each ``--option``
  one of its parser's;
* ``python``/``python3`` (or ``.venv/bin/python``) ``-m MODULE``: a runnable module of the repository
  (``if __name__ == "__main__"`` or a package's ``__main__.py``) or of the standard library; or
  ``python FILE.py`` with the file in the repository;
* ``make TARGET ... VAR=value``: a target of the Makefile, a variable it reads;
* a script of the repository (``scripts/...``), an entry point under ``.venv/bin/``, ``source
  .venv/bin/activate``, ``cd`` into a folder of the repository;
* a tool the docs name as a prerequisite of their own (``EXTERNAL``: curl, docker, kubectl, ...).

And every repository path an argument names must exist: files a command reads (``curl -F file=@X``,
``--data-binary @X``, ``base64 X``) anywhere, other arguments when their first component is a top-level
entry of the repository (so ``model/assets/...`` is checked, ``runs/my-model``, an output, is not).
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
# Tools the docs use as they are, not part of this project (each where it is a stated prerequisite:
# curl and base64 for the API examples, docker for docs/ops.md's containers, kubectl and kustomize for
# deploy/k8s). A command outside this set and the project's own is an error: a typo, or something missing.
EXTERNAL = {"curl", "base64", "docker", "kubectl", "kustomize"}
OPERATORS = {"|", "||", "&&", ";", "&", "(", ")"}
REDIRECTS = {">", ">>", "<", "2>", "&>"}
ENTRY_POINTS = ("patchlife",)  # [project.scripts] of pyproject.toml (test_docs_commands checks this list)
VENV_TOOLS = {"python", "python3", "pip", *ENTRY_POINTS}


@dataclass(frozen=True)
class Block:
    source: str   # file:line of the block's first line
    text: str


def shell_blocks(text: str, name: str, languages: set[str]) -> Iterator[Block]:
    """The fenced blocks tagged with one of ``languages``."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), len(lines))
        if fence.group(2) in languages:
            yield Block(f"{name}:{i + 2}", "\n".join(lines[i + 1:end]))
        i = end + 1


def commands(text: str) -> Iterator[list[str]]:
    """Each simple command of a shell text as words (continuations joined, comments dropped), command
    substitutions ``$(...)`` included as commands of their own."""
    text = text.replace("\\\n", " ")
    for inner in re.findall(r"\$\(([^()]*)\)", text):
        yield from commands(inner)
    for line in _logical_lines(text):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        redirect = False
        for token in lexer:
            if token in OPERATORS:
                if words:
                    yield words
                words = []
            elif token in REDIRECTS or token.rstrip("0123456789") in {">", "<"}:
                redirect = True
            elif redirect:
                redirect = False  # the file a redirection writes or reads: not an argument
            else:
                words.append(token)
        if words:
            yield words


def _logical_lines(text: str) -> Iterator[str]:
    """Lines, a quoted string that spans several kept together."""
    pending = ""
    for line in text.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        yield pending
        pending = ""
    if pending:
        yield pending


def _assignment(word: str) -> bool:
    return re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", word) is not None


def _top_level() -> set[str]:
    ignored = {line.strip().strip("/") for line in (REPO / ".gitignore").read_text().splitlines()}
    return {p.name for p in REPO.iterdir()} - ignored - {".git"}


def _makefile() -> tuple[set[str], set[str]]:
    text = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, re.M))
    variables = set(re.findall(r"\$\(([A-Z_][A-Z0-9_]*)\)", text)) | set(re.findall(r"^([A-Z_]+)\s*\?=", text, re.M))
    return targets, variables


def _runnable_module(name: str) -> str | None:
    """None when ``python -m name`` runs, else why not."""
    path = REPO / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__main__.py"):
        if candidate.is_file():
            if candidate.name == "__main__.py" or re.search(r"^if __name__ == .__main__.:", candidate.read_text(),
                                                             re.M):
                return None
            guard = '`if __name__ == "__main__"`'
            return f"{candidate.relative_to(REPO)} has no {guard}: `python -m {name}` runs nothing"
    if (REPO / name.split(".")[0]).is_dir():
        return f"no module {name} in the repository"
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        found = None
    return None if found is not None else f"no module {name}"


def _check_patchlife(words: list[str]) -> list[str]:
    from cli.main import COMMANDS, parser_for

    if len(words) < 2 or words[1].startswith("-"):
        return [] if len(words) < 2 or words[1] in ("-h", "--help", "-V", "--version") else [f"patchlife {words[1]}?"]
    sub = words[1]
    if sub not in COMMANDS:
        return [f"`patchlife {sub}`: no such subcommand (cli/main.py: {', '.join(COMMANDS)})"]
    known = parser_for(sub)._option_string_actions
    return [f"`patchlife {sub}`: no option {w.split('=')[0]}" for w in words[2:]
            if w.startswith("-") and w.split("=")[0] not in known and not re.match(r"^-\d", w)]


def _check_python(words: list[str]) -> list[str]:
    if "-m" in words[1:]:
        at = words.index("-m")
        if at + 1 >= len(words):
            return ["`python -m` without a module"]
        why = _runnable_module(words[at + 1])
        return [why] if why else []
    scripts = [w for w in words[1:] if w.endswith(".py") and not w.startswith("-")]
    return [f"`{w}`: no such file in the repository" for w in scripts[:1] if not (REPO / w).is_file()]


def _check_make(words: list[str]) -> list[str]:
    targets, variables = _makefile()
    errors = []
    for w in words[1:]:
        if _assignment(w):
            if w.split("=")[0] not in variables:
                errors.append(f"`make {w}`: the Makefile reads no variable {w.split('=')[0]}")
        elif not w.startswith("-") and w not in targets:
            errors.append(f"`make {w}`: no such target in the Makefile")
    return errors


def _input_files(words: list[str]) -> list[str]:
    """Files a command reads from disk: curl's @file forms, base64's operand."""
    files = []
    if words[0] == "curl":
        for w in words[1:]:
            if "@" in w and not w.startswith("-"):
                candidate = w.split("@", 1)[1].split(";")[0]
                if candidate and "://" not in w:
                    files.append(candidate)
    elif words[0] == "base64":
        files += [w for w in words[1:] if not w.startswith("-")]
    return files


def _paths(words: list[str], top: set[str]) -> list[str]:
    """Arguments that name a path inside the repository."""
    found = []
    for w in words[1:]:
        if w.startswith(("-", "$", "/", "http")) or _assignment(w):
            continue
        first = w.split("/")[0]
        if first in top and ("/" in w or w == first):
            found.append(w)
    return found


def _check_source(words: list[str]) -> list[str]:
    if words[1:2] == [".venv/bin/activate"] or (len(words) > 1 and (REPO / words[1]).is_file()):
        return []
    return [f"`{' '.join(words)}`: nothing to source there"]


def _check_cd(words: list[str]) -> list[str]:
    if len(words) < 2 or words[1] == "-" or (REPO / words[1]).is_dir():
        return []
    return [f"`cd {words[1]}`: no such folder in the repository"]


CHECKS = {"patchlife": _check_patchlife, "python": _check_python, "python3": _check_python, "make": _check_make,
          "source": _check_source, ".": _check_source, "cd": _check_cd}


def _check_program(name: str, words: list[str]) -> list[str]:
    if name.startswith(".venv/bin/"):
        tool = name.removeprefix(".venv/bin/")
        if tool not in VENV_TOOLS:
            return [f"`{name}`: make install puts no such program in .venv/bin"]
        name = tool
    if name in CHECKS:
        return CHECKS[name](words)
    if name in EXTERNAL or name in VENV_TOOLS:
        return []
    if "/" in name:  # inside the repository only: a newcomer has nothing beside it (../shared is ours)
        inside = (REPO / name).resolve().is_relative_to(REPO)
        return [] if inside and (REPO / name).is_file() else [f"`{name}`: no such file in the repository"]
    return [f"`{name}`: neither the project's nor a stated prerequisite (tests/docs_commands.py)"]


def check_command(words: list[str]) -> list[str]:
    """What is wrong with one command (empty: nothing found)."""
    while words and _assignment(words[0]):
        words = words[1:]
    if not words:
        return []
    name = words[0]
    errors = _check_program(name, words)
    errors += [f"`{name}` reads {path}, which is not in the repository" for path in _input_files(words)
               if not path.startswith(("/tmp/", "$")) and not (REPO / path).is_file()]
    errors += [f"`{name}`: {p} does not exist in the repository" for p in _paths(words, _top_level())
               if not (REPO / p).exists()]
    return errors


def check_text(text: str, name: str) -> list[str]:
    """``file:line: problem`` for every shell block of a Markdown text, and every file a Python block opens
    by a relative path (``open("...")``) that is not in the repository."""
    errors = []
    for block in shell_blocks(text, name, SHELL_LANGUAGES):
        try:
            errors += [f"{block.source}: {error}" for words in commands(block.text) for error in check_command(words)]
        except ValueError as exc:  # shlex: an open quote
            errors.append(f"{block.source}: {exc} (an open quote)")
    for block in shell_blocks(text, name, {"python"}):
        errors += [f"{block.source}: opens {path}, which is not in the repository"
                   for path in re.findall(r"""open\(\s*["']([^"'/][^"']*)["']""", block.text)
                   if not (REPO / path).is_file()]
    return errors


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def main() -> int:
    p = argparse.ArgumentParser(description="check the commands of README.md and docs/*.md")
    p.parse_args()
    errors = [e for doc in documents() for e in check_text(doc.read_text(), str(doc.relative_to(REPO)))]
    print("\n".join(errors) or "every command names what exists")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Every command in README.md and docs/*.md names what exists (tests/docs_commands.py), and the checker
catches what it is for: a snippet naming something missing is refused."""

from __future__ import annotations

import pytest
import tomllib
from docs_commands import (
    ENTRY_POINTS,
    REPO,
    SHELL_LANGUAGES,
    check_command,
    check_text,
    commands,
    documents,
    shell_blocks,
)


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_in_the_docs_names_what_exists(doc) -> None:  # noqa: ANN001 (a Path)
    errors = check_text(doc.read_text(), str(doc.relative_to(REPO)))
    assert not errors, "\n".join(errors)


def test_the_docs_have_commands_to_check() -> None:
    text = (REPO / "README.md").read_text()
    assert "```bash\nmake install" in text and "source .venv/bin/activate" in text  # the two set-up commands
    blocks = [b for d in documents() for b in shell_blocks(d.read_text(), d.name, SHELL_LANGUAGES)]
    assert len([w for b in blocks for w in commands(b.text)]) > 30


def test_entry_points_are_pyprojects() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(ENTRY_POINTS) == set(scripts)


def _errors(snippet: str, lang: str = "bash") -> list[str]:
    return check_text(f"# doc\n\n```{lang}\n{snippet}\n```\n", "doc.md")


GOOD = [
    "patchlife serve",
    ".venv/bin/patchlife ensure-default --variant heavy --out out/heavy",
    "PATCHLIFE_CHECKPOINT=runs/flowers patchlife serve &",
    "patchlife loadtest --url http://127.0.0.1:8000 --duration 15",
    "python -m bench.perf_inputs /tmp/pa",
    "curl -s localhost:8000/v1/models | python3 -m json.tool",
    "curl -F file=@model/assets/default/examples/busy.png 'localhost:8000/classify?top_k=3'",
    'curl -d "{\\"images\\": [\\"$(base64 -w0 model/assets/default/examples/busy.png)\\"]}" localhost:8000/classify',
    "make install TORCH=cpu",
    "make gpu-check NO_INSTALL=1 PYTHON=python3",
    "source .venv/bin/activate",
    "scripts/perf-analyzer -m patchlife-default -u 127.0.0.1:8001",
    "python scripts/decode_memory.py --modes",
    "cd deploy/k8s/overlays/cpu && kustomize edit set image x=y && cd -",
    "docker compose -f docker-compose.yml -f docker-compose.gpu.yml up --build   # a comment's words: nope nothing",
]


@pytest.mark.parametrize("snippet", GOOD)
def test_what_exists_passes(snippet: str) -> None:
    assert _errors(snippet) == []


BAD = [
    ("patchlif serve", "neither the project's"),
    ("patchlife servee", "no such subcommand"),
    ("patchlife serve --nope 1", "no option --nope"),
    ("patchlife train \\\n    --epochz 3", "no option --epochz"),
    ("python -m bench.nope", "no module bench.nope"),
    ("python -m model.life", "has no `if __name__"),
    ("python -m not_a_module_anywhere", "no module not_a_module_anywhere"),
    ("python scripts/nope.py", "no such file"),
    ("make nope", "no such target"),
    ("make run TORHC=cpu", "no variable TORHC"),
    ("curl -F file=@photo.jpg localhost:8000/classify", "reads photo.jpg"),
    ("curl --data-binary @model/assets/default/examples/nope.png localhost:8000/classify", "reads model/assets"),
    ('curl -d "{\\"images\\": [\\"$(base64 -w0 cat.jpg)\\"]}" localhost:8000/classify', "reads cat.jpg"),
    ("perf_analyzer -m patchlife-default", "neither the project's"),
    ("../shared/tools/perf-analyzer -m x", "no such file"),
    (".venv/bin/nope", "no such program"),
    ("cd deploy/nowhere", "no such folder"),
    ("docker build -f docker/Nopefile .", "docker/Nopefile does not exist"),
    ("ls | grep x", "neither the project's"),
]


@pytest.mark.parametrize("snippet,why", BAD)
def test_what_is_missing_is_refused(snippet: str, why: str) -> None:
    errors = _errors(snippet)
    assert errors and any(why in e for e in errors), errors
    assert errors[0].startswith("doc.md:4: ")  # where: the block's first line


def test_an_open_quote_is_reported() -> None:
    assert any("quote" in e for e in _errors("curl -d 'x localhost:8000"))


def test_python_blocks_open_only_files_of_the_repository() -> None:
    assert _errors('open("photo.jpg", "rb").read()', "python") != []
    assert _errors('open("model/assets/default/examples/busy.png", "rb").read()', "python") == []


def test_other_blocks_are_not_read() -> None:
    assert _errors("patchlif serve", "text") == [] and _errors("patchlif serve", "json") == []


def test_a_command_is_split_at_operators_and_assignments() -> None:
    assert list(commands("A=1 B=2 patchlife serve & curl x | python3 -m json.tool > out.json")) == [
        ["A=1", "B=2", "patchlife", "serve"], ["curl", "x"], ["python3", "-m", "json.tool"]]
    assert check_command(["A=1"]) == []

"""The docs show only commands the code accepts, and link only to files that exist.

Every `--flag` that a command line in the Markdown docs passes to train.py,
evaluate.py, `python -m data_pipeline.<module>`, `python -m brats_tf.export`,
`python -m brats_tf.postprocess` or `python -m serving.client` must be one of that program's absl flags, read from
its own `--helpfull` (each program runs once, in a subprocess, all at once).
Command lines come from fenced code blocks (backslash continuations joined)
and from inline code spans. Every relative Markdown link must point to an
existing file, and an anchor in it to one of that file's headings.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The hand-written docs (benchmarks/RESULTS.md and benchmarks/history/ are generated).
DOCS = sorted([ROOT / "README.md", ROOT / "WORKSPACE.md", *(ROOT / "docs").glob("*.md"),
               ROOT / "benchmarks" / "gpu.md", ROOT / "data_pipeline" / "README.md",
               *(ROOT / "brats_tf").glob("*.md")])

SCRIPTS = ("train.py", "evaluate.py")
MODULES = re.compile(r"^(data_pipeline\.\w+|brats_tf\.export|brats_tf\.postprocess|"
                     r"serving\.client)$")
SHELL_BREAKS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>&1"}
README_LIMIT_BYTES = 10 * 1024


def _inline_spans(prose: list[tuple[int, str]]):
    """(line number, code span) of inline code in consecutive prose lines; a span may
    continue on the next line, never across a blank line."""
    if not prose:
        return
    first, text = prose[0][0], "\n".join(line for _, line in prose)
    for match in re.finditer(r"`((?:[^`\n]|\n(?![ \t]*\n))+)`", text):
        yield first + text.count("\n", 0, match.start()), match.group(1).replace("\n", " ")


def _code_lines(text: str):
    """(line number, logical command line) of fenced code blocks and inline code spans."""
    fenced = False
    pending, start = "", 0
    prose: list[tuple[int, str]] = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.lstrip().startswith("```"):
            if not fenced:
                yield from _inline_spans(prose)
                prose = []
            fenced = not fenced
            pending = ""
            continue
        if not fenced:
            prose.append((number, line))
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    yield from _inline_spans(prose)


def _program(tokens: list[str], i: int) -> str | None:
    token = tokens[i]
    if os.path.basename(token) in SCRIPTS:
        return os.path.basename(token)
    if token == "-m" and i + 1 < len(tokens) and MODULES.match(tokens[i + 1]):
        return tokens[i + 1]
    return None


def _commands(text: str):
    """(line number, program, [flag names]) for each command line that runs a program."""
    for number, line in _code_lines(text):
        if not any(s in line for s in SCRIPTS) and "-m " not in line:
            continue
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError:  # an unbalanced quote: Python, not a shell line
            tokens = line.split()
        for i in range(len(tokens)):
            program = _program(tokens, i)
            if program is None:
                continue
            names = []
            for token in tokens[i + 1:]:
                if token in SHELL_BREAKS:
                    break
                token = token.lstrip("[(")
                if token.startswith("--") and len(token) > 2:
                    names.append(re.split(r"[=\])`,]", token[2:], maxsplit=1)[0])
            yield number, program, names
            break


def _shown_flags() -> dict[str, list[tuple[str, int, str]]]:
    """program -> [(doc, line, flag name)] over all docs."""
    shown: dict[str, list[tuple[str, int, str]]] = {}
    for doc in DOCS:
        for number, program, names in _commands(doc.read_text(encoding="utf-8")):
            entries = shown.setdefault(program, [])
            entries.extend((str(doc.relative_to(ROOT)), number, name) for name in names)
    return shown


SHOWN = _shown_flags()


def _help_command(program: str) -> list[str]:
    if program in SCRIPTS:
        return [sys.executable, program, "--helpfull"]
    return [sys.executable, "-m", program, "--helpfull"]


def _defined_flags(program: str) -> set[str]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(_help_command(program), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    names = set()
    for match in re.finditer(r"^\s+--(\[no\])?([A-Za-z0-9_]+)", result.stdout, re.MULTILINE):
        names.add(match.group(2))
        if match.group(1):  # a boolean: --name and --noname
            names.add("no" + match.group(2))
    if "flagfile" not in names:
        raise AssertionError(f"{program} --helpfull listed no flags (exit {result.returncode}):\n"
                             f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return names


@pytest.fixture(scope="module")
def defined_flags() -> dict[str, set[str]]:
    """program -> its flag names, every program's --helpfull run side by side."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(SHOWN) or 1) as pool:
        return dict(zip(SHOWN, pool.map(_defined_flags, SHOWN)))


def test_the_docs_show_commands_of_every_entry_point():
    for program in ("train.py", "evaluate.py", "data_pipeline.convert", "serving.client"):
        assert program in SHOWN, f"no command line for {program} found in {DOCS}"


@pytest.mark.parametrize("program", sorted(SHOWN))
def test_every_flag_shown_in_the_docs_exists(program, defined_flags):
    unknown = [f"{doc}:{line}: --{name}" for doc, line, name in SHOWN[program]
               if name not in defined_flags[program]]
    assert not unknown, f"flags that {program} does not define:\n" + "\n".join(unknown)


def test_command_parsing_joins_continuations_and_reads_inline_code():
    text = ("```bash\nTF_CONFIG='{\"a\": 1}' \\\n  python train.py --flagfile=x \\\n"
            "  --model_dir=y  # --not_a_flag\n```\n"
            "Then `python -m brats_tf.export --model=m.keras [--overwrite]` and "
            "`evaluate.py --tta`; `--recompute` alone is no command; `train.py\n"
            "--epochs=3 --noexport` spans two lines.\n")
    assert list(_commands(text)) == [
        (2, "train.py", ["flagfile", "model_dir"]),
        (6, "brats_tf.export", ["model", "overwrite"]),
        (6, "evaluate.py", ["tta"]),
        (6, "train.py", ["epochs", "noexport"]),
    ]


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.MULTILINE)}


def _links(path: pathlib.Path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    for match in re.finditer(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        yield match.group(1)


def test_slug_matches_githubs_anchors():
    assert _slug("The README's figure") == "the-readmes-figure"
    assert _slug("Smaller GPUs, less memory") == "smaller-gpus-less-memory"
    assert _slug("`make demo` runs") == "make-demo-runs"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(doc):
    broken = []
    for target in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        path = (doc.parent / file_part).resolve() if file_part else doc
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{doc.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_readme_stays_short():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_LIMIT_BYTES, f"README.md is {size} bytes; move details to docs/"

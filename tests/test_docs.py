"""The docs: docs/configs.md is what the generator prints, and every command shown in README.md and
docs/**/*.md is run by a test or marked as needing what this machine lacks (docs/testing.md,
"Commands in the docs")."""
import ast
import dataclasses
import re
import shlex
import time
from pathlib import Path
from typing import Optional

import pytest

from conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# A shell line that runs the project: the CLI, make, a module of the package, the launch scripts.
COMMAND = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S+\s+)*(?:xla-trainer\b|make\b|python3? -m xla_trainer\b|"
                     r"(?:bash\s+|sbatch\s+)?(?:tpu|gpu)_scripts/\S+)")
FENCE = re.compile(r"^\s*```(\w*)\s*$")
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
NEEDS = {"TPU", "TPU pod", "GPU", "GPUs", "network", "ImageNet", "GCS", "gcloud", "Slurm"}
MARKER = re.compile(r"\b(needs|tested):\s*([^;#]+?)\s*(?=;|#|$)")
CHEAP_TEST = "tests/test_docs.py::test_cheap_doc_commands_run"
CHEAP = {"--help", "describe"}  # what test_cheap_doc_commands_run may run: no data, no training


def doc_commands():
    """(file, line number, command, comment) of every project command in a shell code block;
    continuation lines (a trailing backslash) joined; a leading `$ ` dropped."""
    found = []
    for path in DOCS:
        lines, fence, pending = path.read_text().split("\n"), None, None
        for number, line in enumerate(lines, 1):
            m = FENCE.match(line)
            if m:
                fence = None if fence is not None else m.group(1)
                continue
            if fence is None or fence not in SHELL_FENCES:
                continue
            if pending is not None:
                pending = (pending[0], pending[1] + " " + line.strip())
            else:
                pending = (number, line.strip())
            if pending[1].endswith("\\"):
                pending = (pending[0], pending[1][:-1].rstrip())
                continue
            start, text = pending
            pending = None
            text = text[2:] if text.startswith("$ ") else text
            command, _, comment = text.partition(" # ")
            if text.startswith("#") or not COMMAND.match(command.strip()):
                continue
            found.append((str(path.relative_to(REPO)), start, command.strip(), comment.strip()))
    return found


def subcommand(command: str) -> str:
    """The word a test about `command` must mention: the CLI subcommand, the make target, the
    module, the script."""
    words = [w for w in shlex.split(command) if not re.match(r"^[A-Z_][A-Z0-9_]*=", w)]
    if words[0] in ("bash", "sbatch"):
        words = words[1:]
    if words[0] == "xla-trainer" or words[:3] == ["python", "-m", "xla_trainer"] or \
            words[:3] == ["python3", "-m", "xla_trainer"]:
        rest = words[1:] if words[0] == "xla-trainer" else words[3:]
        return rest[0] if rest else "--help"
    if words[0] in ("python", "python3") and words[1] == "-m":
        return words[2].split(".")[-1]  # python -m xla_trainer.bench_scan -> bench_scan
    if words[0] == "make":
        return words[1] if len(words) > 1 else "make"
    return Path(words[0]).name  # tpu_scripts/launch.sh -> launch.sh


def source_of(reference: str) -> str | None:
    """The source of `tests/file.py::name` (a function or a class), or None where there is none."""
    file, _, name = reference.partition("::")
    path = REPO / file
    if not path.is_file() or not name:
        return None
    source = path.read_text()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return ast.get_source_segment(source, node)
    return None


def mentions(source: str, word: str, command: str) -> bool:
    """Whether a test's source names the command's subcommand (as a word) or its --config file."""
    if re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", source):
        return True
    config = re.search(r"--config\s+(\S+)", command)
    return bool(config) and config.group(1) in source


def test_the_docs_show_commands():
    found = doc_commands()
    assert len(found) > 40
    assert any(c == "make demo" for _, _, c, _ in found)


def test_every_doc_command_is_tested_or_marked():
    problems = []
    for file, line, command, comment in doc_commands():
        where = f"{file}:{line}: {command[:70]}"
        markers = MARKER.findall(comment)
        if not markers:
            problems.append(f"{where}: no marker (end the line with '# needs: TPU' or '# tested: tests/...::test')")
            continue
        for kind, value in markers:
            if kind == "needs":
                unknown = [n.strip() for n in value.split(",") if n.strip() not in NEEDS]
                if unknown:
                    problems.append(f"{where}: needs {unknown}, not one of {sorted(NEEDS)}")
            else:
                source = source_of(value)
                word = subcommand(command)
                if source is None:
                    problems.append(f"{where}: tested: {value} is not a test in that file")
                elif value == CHEAP_TEST and word not in CHEAP:
                    problems.append(f"{where}: {word} is not cheap enough for {CHEAP_TEST} ({sorted(CHEAP)})")
                elif value != CHEAP_TEST and not mentions(source, word, command):
                    problems.append(f"{where}: {value} mentions neither '{word}' nor the command's --config")
    assert not problems, "\n".join(problems)


def test_cheap_doc_commands_run(capsys):
    """Every doc command marked with this test runs here, in-process, exit 0: `--help` and
    `describe` of small configs."""
    from xla_trainer.cli import main
    marked = [(f, n, c) for f, n, c, comment in doc_commands() if CHEAP_TEST in comment]
    assert marked
    start = time.monotonic()
    for file, line, command in marked:
        words = shlex.split(command)
        args = words[1:] if words[0] == "xla-trainer" else words[3:]
        assert subcommand(command) in CHEAP, f"{file}:{line}"
        try:
            code = main(args)
        except SystemExit as e:  # --help
            code = e.code
        assert code == 0, f"{file}:{line}: {command} exited {code}: {capsys.readouterr().err[-2000:]}"
    assert time.monotonic() - start < 60


def test_configs_md_is_what_the_generator_prints():
    from xla_trainer.config_docs import COMMAND as REGENERATE, generate
    assert (REPO / "docs" / "configs.md").read_text() == generate(), \
        f"docs/configs.md is stale: regenerate it with `{REGENERATE}`"


@dataclasses.dataclass
class _Base:
    kept: int = 1  # from the base class


@dataclasses.dataclass
class _Section(_Base):
    plain: int = 0
    # a comment above,
    # on two lines
    both: float = 0.5  # and one at the end
    trailing: Optional[str] = None  # only | at the end

    # a blank line cuts this one off

    after_blank: list = dataclasses.field(default_factory=lambda: [1, 2])


def test_a_keys_meaning_is_its_source_comment():
    from xla_trainer.config_docs import comment, rows
    assert comment(_Section, "plain") == ""
    assert comment(_Section, "both") == "a comment above, on two lines. and one at the end"
    assert comment(_Section, "trailing") == "only | at the end"
    assert comment(_Section, "after_blank") == ""
    assert comment(_Section, "kept") == "from the base class"
    table = "\n".join(rows("sec", _Section, None, {}))
    assert "| `sec` | `trailing` | str or null | `null` | only \\| at the end |" in table
    assert "| `sec` | `after_blank` | list | `[1, 2]` |  |" in table


def test_every_config_key_is_in_configs_md():
    from xla_trainer.config import Config
    text = (REPO / "docs" / "configs.md").read_text()
    cfg = Config()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        keys = [g.name for g in dataclasses.fields(value)] if dataclasses.is_dataclass(value) else [f.name]
        for key in keys:
            assert f"| `{key}` |" in text, f"{f.name}.{key}"


def test_doc_links_point_at_files():
    broken = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" not in target and not (path.parent / target).exists():
                broken.append(f"{path.relative_to(REPO)}: {target}")
    assert not broken, "\n".join(broken)


def test_bench_scan_runs(capsys):
    """`python -m xla_trainer.bench_scan` (docs/methods/adventurer.md), at a size that takes seconds."""
    from xla_trainer.bench_scan import main
    main(["--backend", "cpu", "--tokens", "16", "--batch", "1", "--steps", "1"])
    assert "16" in capsys.readouterr().out


@pytest.mark.parametrize("command,word", [
    ("xla-trainer linprobe --config configs/x.yaml", "linprobe"),
    ("PJRT_DEVICE=CPU xla-trainer bench --steps 20", "bench"),
    ("python -m xla_trainer --help", "--help"),
    ("python -m xla_trainer.bench_scan --backend cpu", "bench_scan"),
    ("make demo", "demo"),
    ("tpu_scripts/launch.sh pretrain --config c.yaml", "launch.sh"),
    ("bash gpu_scripts/device_check.sh", "device_check.sh"),
])
def test_subcommand_of_a_doc_command(command, word):
    assert subcommand(command) == word

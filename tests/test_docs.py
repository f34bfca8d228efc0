"""The short commands that docs/ marks to run (fenced blocks tagged `bash runs`) run as written.

A block tagged `bash runs` holds one command per line. Where a plain fenced block follows it, that is
what the commands print; an output that starts with `error:` means exit status 2, any other 0.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```\n", re.S | re.M)


def runnable_commands():
    """(page, command, expected output or None) for every line of every `bash runs` block in docs/."""
    found = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        blocks = list(FENCE.finditer(page.read_text()))
        for block, after in zip(blocks, blocks[1:] + [None]):
            if block.group(1).split() != ["bash", "runs"]:
                continue
            follows = after is not None and after.group(1) == "" and not page.read_text()[block.end():after.start()].strip()
            expected = after.group(2) if follows else None
            for command in block.group(2).splitlines():
                found.append((page.name, command, expected))
    return found


COMMANDS = runnable_commands()


def test_docs_mark_commands_to_run():
    assert len(COMMANDS) >= 3, COMMANDS


@pytest.fixture(scope="module")
def results():
    """Every command's exit status and output, the commands started at once (each is a few seconds of imports)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    started = [subprocess.Popen(command.replace("python ", f"{sys.executable} ", 1), shell=True, cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _, command, _ in COMMANDS]
    return [(p.wait(timeout=120), p.stdout.read()) for p in started]


@pytest.mark.parametrize("index", range(len(COMMANDS)), ids=[f"{page}: {cmd}" for page, cmd, _ in COMMANDS])
def test_command_runs_as_written(results, index):
    page, command, expected = COMMANDS[index]
    status, output = results[index]
    if expected is None:
        assert status == 0, f"{page}: `{command}` exited {status}:\n{output}"
    else:
        assert status == (2 if expected.startswith("error:") else 0), output
        assert output == expected, f"{page}: `{command}` printed\n{output}"

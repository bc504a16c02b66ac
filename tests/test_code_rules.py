"""Rules of the house that a reviewer would otherwise check by eye: short functions, and a
library whose errors speak of settings, never of command-line flags."""

import ast
import re
from pathlib import Path

import pytest

from hunyuan_tpu.files import InputError

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80


def _functions(folder: str):
    for path in sorted((ROOT / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


@pytest.mark.parametrize("folder", ["hunyuan_tpu", "run"])
def test_no_function_is_longer_than_80_lines(folder):
    long = [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, node in _functions(folder) if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


def _strings(node: ast.AST):
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str):
            yield child.value


def test_library_errors_name_settings_not_flags():
    flags = []
    for path in sorted((ROOT / "hunyuan_tpu").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                flags += [f"{path.name}:{node.lineno}: {s!r}" for s in _strings(node.exc) if re.search(r"--[a-z]", s)]
    assert not flags, flags


def test_a_setting_renders_as_its_flag_on_the_command_line():
    error = InputError("{cache_start_step} 30 is after {cache_end_step} 20 (dict {'a': 1} kept)")
    assert str(error) == "cache_start_step 30 is after cache_end_step 20 (dict {'a': 1} kept)"
    assert error.render(lambda name: f"--{name}") == "--cache_start_step 30 is after --cache_end_step 20 (dict {'a': 1} kept)"

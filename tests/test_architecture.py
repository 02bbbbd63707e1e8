"""The walls between layers (docs/11-architecture.md): the library never imports a command-line module.

Command-line modules parse arguments and call the library; if a library module imported one, the
training loop would again sit on top of a tool (as it once sat on evaluate.py and generate.py).
"""

import ast
from pathlib import Path

import nanotrain

PACKAGE = Path(nanotrain.__file__).parent
COMMANDS = {"train", "prepare", "generate", "evaluate", "export", "bench", "plot"}  # `python -m nanotrain.X`


def imported_nanotrain_modules(file: Path) -> set[str]:
    """Every nanotrain module `file` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "nanotrain":  # from nanotrain import distributed, run_directory
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("nanotrain."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("nanotrain.")}
    return found


def library_modules() -> list[Path]:
    return [file for file in sorted(PACKAGE.glob("*.py")) if file.stem not in COMMANDS]


def test_every_command_is_a_module_with_a_main():
    for name in COMMANDS:
        source = (PACKAGE / f"{name}.py").read_text()
        assert "def main(" in source and 'if __name__ == "__main__":' in source, name


def test_no_library_module_imports_a_command_line_module():
    offenders = {file.name: sorted(imported_nanotrain_modules(file) & COMMANDS) for file in library_modules()}
    assert {name: cli for name, cli in offenders.items() if cli} == {}


def test_the_model_knows_nothing_of_parallelism_or_precision():
    # parallelize() wraps a plain model from outside (torchtitan's rule); tensor parallelism must keep it so
    assert imported_nanotrain_modules(PACKAGE / "model.py") <= {"config", "flavours", "loss"}
    assert imported_nanotrain_modules(PACKAGE / "loss.py") == set()


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from nanotrain.generate import main\n    import nanotrain.prepare\n"
                     "from nanotrain import train\n")
    assert imported_nanotrain_modules(probe) == {"generate", "prepare", "train"}

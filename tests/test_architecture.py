"""The walls between layers (docs/11-architecture.md): the library never imports a command-line module.

Command-line modules parse arguments and call the library; if a library module imported one, the
training loop would again sit on top of a tool (as it once sat on evaluate.py and generate.py).
"""

import ast
from pathlib import Path

import nanotrain

PACKAGE = Path(nanotrain.__file__).parent
COMMANDS = {"train", "prepare", "generate", "evaluate", "export", "bench", "plot"}  # `python -m nanotrain.X`


def module_name(file: Path) -> str:
    """A module's dotted name inside the package: `training.trainer` for nanotrain/training/trainer.py."""
    return ".".join(file.relative_to(PACKAGE).with_suffix("").parts)


def is_module(name: str) -> bool:
    """Whether the dotted `name` (as `module_name` gives it) is a module or room of the package."""
    path = PACKAGE.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_nanotrain_modules(file: Path) -> set[str]:
    """Every nanotrain module `file` imports, at the top or inside a function, named as by `module_name`."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.ImportFrom) and node.module and f"{node.module}.".startswith("nanotrain."):
            package = node.module.removeprefix("nanotrain").removeprefix(".")
            for alias in node.names:  # from nanotrain.parallel import distributed: a module, not a name in one
                submodule = f"{package}.{alias.name}".removeprefix(".")
                found.add(submodule if is_module(submodule) else package)
        elif isinstance(node, ast.Import):
            found |= {alias.name.removeprefix("nanotrain.") for alias in node.names
                      if alias.name.startswith("nanotrain.")}
    return found - {""}  # "": a name of the package itself (from nanotrain import build_model)


def library_modules() -> list[Path]:
    return [file for file in sorted(PACKAGE.rglob("*.py")) if module_name(file) not in COMMANDS]


def test_every_command_is_a_module_with_a_main():
    for name in COMMANDS:
        source = (PACKAGE / f"{name}.py").read_text()
        assert "def main(" in source and 'if __name__ == "__main__":' in source, name


def test_no_library_module_imports_a_command_line_module():
    offenders = {module_name(file): sorted(imported_nanotrain_modules(file) & COMMANDS) for file in library_modules()}
    assert {name: cli for name, cli in offenders.items() if cli} == {}


def test_the_model_knows_nothing_of_parallelism_or_precision():
    # parallelize() wraps a plain model from outside (torchtitan's rule); tensor parallelism must keep it so
    assert imported_nanotrain_modules(PACKAGE / "model/transformer.py") <= {"config", "model.flavours", "model.loss"}
    assert imported_nanotrain_modules(PACKAGE / "model/loss.py") == set()


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from nanotrain.generate import main\n    import nanotrain.prepare\n"
                     "from nanotrain import train\n")
    assert imported_nanotrain_modules(probe) == {"generate", "prepare", "train"}

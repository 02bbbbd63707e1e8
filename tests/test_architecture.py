"""The room contracts (docs/11-architecture.md): what may import what, read from the chapter's table.

Every module of the package belongs to a room: a subpackage (`training/`), one of the foundations
(`config`, `errors`, `files`), the commands (`python -m nanotrain.X`) or `api` (the package's
`__init__`). docs/11's contract table says, per room, which rooms it may import; these tests walk
every module with `ast`, imports inside functions included, and fail on an import the table does
not allow, on a library module importing a command, on the model importing parallelism, and on
any import cycle between modules.
"""

import ast
import re
from pathlib import Path

import nanotrain

PACKAGE = Path(nanotrain.__file__).parent
CHAPTER = PACKAGE.parent / "docs" / "11-architecture.md"
FOUNDATIONS = {"config", "errors", "files"}
COMMANDS = {"train", "prepare", "generate", "evaluate", "export", "bench", "plot", "gpu_check"}  # python -m nanotrain.X


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


def room_of(module: str) -> str:
    """The room a module (or a room's package, `data`) lives in."""
    top = module.split(".")[0]
    if "." in module or (PACKAGE / top / "__init__.py").is_file():
        return top
    if top in FOUNDATIONS:
        return top
    return "api" if top == "__init__" else "commands" if top in COMMANDS else f"unplaced module {top}"


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports; a room's package stands for its __init__."""
    def node(name: str) -> str:
        return f"{name}.__init__" if (PACKAGE.joinpath(*name.split(".")) / "__init__.py").is_file() else name
    return {module_name(file): {node(name) for name in imported_nanotrain_modules(file)}
            for file in sorted(PACKAGE.rglob("*.py"))}


def contract() -> dict[str, set[str]]:
    """docs/11's contract table: room -> the rooms it may import ('foundations' and 'every room' expanded)."""
    rows = re.findall(r"^\| `([\w_]+)/?` \|.*\| ([^|]+) \|$", CHAPTER.read_text(), flags=re.MULTILINE)
    rooms = {room for room, _ in rows}
    allowed = {}
    for room, may_import in rows:
        names = {name.strip(" `/") for name in may_import.split(",")} - {"nothing"}
        if "foundations" in names:
            names = names - {"foundations"} | FOUNDATIONS
        allowed[room] = rooms - {room} if "every room" in names else names
    return allowed


def test_the_contract_table_names_every_room_and_only_rooms():
    allowed = contract()
    rooms = {room_of(module) for module in import_graph()}
    assert set(allowed) == rooms
    assert {name for names in allowed.values() for name in names} <= rooms


def test_the_contract_table_is_layered_foundations_importing_only_each_other():
    allowed = contract()
    assert allowed["files"] == set() and allowed["errors"] == {"files"} and allowed["config"] == {"errors", "files"}
    assert not [(a, b) for a in allowed for b in allowed[a] if a in allowed[b]], "two rooms may import each other"


def test_every_import_is_one_the_contract_allows():
    allowed = contract()
    broken = sorted(f"{module} -> {imported}" for module, imports in import_graph().items() for imported in imports
                    if room_of(imported) != room_of(module) and room_of(imported) not in allowed[room_of(module)])
    assert broken == [], "add the room to the row in docs/11 only if the layering still reads top to bottom"


def import_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Each cycle a depth-first walk of `graph` closes, as `a -> b -> a`."""
    cycles, state = [], {}  # state: "open" while on the walk's path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                cycles.append(" -> ".join((path + [module])[(path + [module]).index(imported):] + [imported]))
            elif imported not in state:
                visit(imported, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return cycles


def test_no_import_cycle_between_modules():
    assert import_cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle_closed_inside_a_function(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from nanotrain.reporting.run_log import RunLog\n")
    graph = {"reporting.run_log": {"a.b"}, "a.b": imported_nanotrain_modules(probe)}
    assert import_cycles(graph) == ["a.b -> reporting.run_log -> a.b"]


def test_every_command_is_a_module_with_a_main():
    for name in COMMANDS:
        source = (PACKAGE / f"{name}.py").read_text()
        assert "def main(" in source and 'if __name__ == "__main__":' in source, name


def test_no_library_module_imports_a_command_line_module():
    offenders = {module: sorted(imports & COMMANDS) for module, imports in import_graph().items()
                 if room_of(module) != "commands"}
    assert {name: cli for name, cli in offenders.items() if cli} == {}


def test_the_model_knows_nothing_of_parallelism_or_precision():
    # parallelize() wraps a plain model from outside (torchtitan's rule); tensor parallelism must keep it so
    assert imported_nanotrain_modules(PACKAGE / "model/transformer.py") <= {"config", "model.loss"}
    assert imported_nanotrain_modules(PACKAGE / "model/loss.py") == set()
    assert not {room_of(m) for module, imports in import_graph().items() if room_of(module) == "model"
                for m in imports} & {"parallel", "training", "checkpoint"}


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from nanotrain.generate import main\n    import nanotrain.prepare\n"
                     "from nanotrain import train\n")
    assert imported_nanotrain_modules(probe) == {"generate", "prepare", "train"}

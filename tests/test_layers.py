"""The package's layers import only downwards (docs/design.md, "Layout")."""

import ast
from pathlib import Path

import amtl_compress

PACKAGE = Path(amtl_compress.__file__).parent

#: Lowest first; a module may import from its own layer and the layers before it.
LAYERS = [
    {"errors", "_io", "_text", "_svg", "_config"},
    {"core"},
    {"surgery"},
    {"data"},
    {"models"},
    {"checkpoint"},
    {"run_dir"},
    {"training", "planning"},  # planning scores truncation with training/loop.py; finetune
                               # uses it for target_ratio="auto"
    {"storage"},
    {"lookup"},
    {"evaluation", "demo"},
    {"cli", "__main__", "__init__"},
]


def _layer(part: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if part in names)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every `amtl_compress.*` import outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.startswith("amtl_compress.")]
    return found


def test_every_module_is_in_a_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        top = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        assert any(top in names for names in LAYERS), f"{path} is in no layer of LAYERS"


def test_imports_point_down() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _layer(path.relative_to(PACKAGE).parts[0].removesuffix(".py"))
        for line, module in _imports(path):
            target = _layer(module.split(".")[1])
            if target > own:
                upward.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}")
    assert not upward, "imports reaching up a layer:\n" + "\n".join(upward)

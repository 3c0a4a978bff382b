"""The package's shape (issue 15), beyond the import-linter layers contract that `make test` runs: no module
imports another package's private names, and no module is over 500 lines."""

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src" / "mmfusion"


def _package(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] != "__init__" else parts[:-1])


def _resolve(module: str | None, level: int, package: str) -> str:
    if level == 0:
        return module or ""
    base = package.split(".")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def private_imports_across_packages() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        package = _package(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            target = _resolve(node.module, node.level, package)
            if not target.startswith("mmfusion"):
                continue
            target_package = (
                target if (SRC.parent / target.replace(".", "/")).is_dir() else target.rsplit(".", 1)[0]
            )
            for alias in node.names:
                if (
                    alias.name.startswith("_")
                    and not alias.name.startswith("__")
                    and target_package != package
                ):
                    found.append(
                        f"{path.relative_to(SRC.parent)}:{node.lineno} imports {alias.name} from {target}"
                    )
    return found


def test_no_module_imports_another_packages_private_names():
    assert private_imports_across_packages() == []


def test_no_module_is_over_500_lines():
    long = {
        str(p.relative_to(SRC.parent)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 500
    }
    assert long == {}


def test_no_import_cycles_between_packages_or_modules():
    grimp = __import__("grimp")  # import-linter's graph library (a dev dependency)
    graph = grimp.build_graph("mmfusion", exclude_type_checking_imports=True)
    edges = {(m, t) for m in graph.modules for t in graph.find_modules_directly_imported_by(m)}

    def package(m: str) -> str:
        return ".".join(m.split(".")[:2])

    packages = {(package(a), package(b)) for a, b in edges if package(a) != package(b)}
    assert sorted((a, b) for a, b in packages if (b, a) in packages) == []
    assert sorted((a, b) for a, b in edges if (b, a) in edges) == []

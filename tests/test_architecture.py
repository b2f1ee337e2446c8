"""No import cycle among the package's modules, counting imports inside functions.

The layers contract in pyproject.toml (``lint-imports``, run by scripts/test.sh) keeps each layer from importing
the ones above it, but modules of one layer, or of one sub-package, could still import each other in a circle:
this test finds those on the same graph (grimp reads every import statement, inside functions too)."""

from __future__ import annotations

import grimp


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """One shortest cycle through each module that is on one: [a, b, ..., a], each cycle once."""
    cycles, seen = [], set()
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            back = graph.find_shortest_chain(importer=imported, imported=module)
            if back is not None and frozenset(back) not in seen:
                seen.add(frozenset(back))
                cycles.append([module, *back])
    return cycles


def test_import_cycles_are_found_inside_functions_too(tmp_path, monkeypatch):
    """The finder itself, on a package whose only cycle is two imports inside functions."""
    package = tmp_path / "loop"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from loop import b\n")
    (package / "b.py").write_text("class C:\n    def m(self):\n        import loop.a\n")
    (package / "c.py").write_text("import loop.a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_cycles(grimp.build_graph("loop", cache_dir=None)) == [["loop.a", "loop.b", "loop.a"]]


def test_the_package_has_no_import_cycle():
    cycles = import_cycles(grimp.build_graph("mlx_intent", cache_dir=None))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)

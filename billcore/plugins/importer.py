"""Import a plugin's package from verified in-memory source.

Theory of operation
-------------------
``SourceImporter`` is a meta-path finder and loader for exactly one package
name (``billcore_plugin_<name>``) and its submodules.  It serves modules from
a dict of relative path → source bytes that the signature was verified over,
compiling them itself with ``compile()``: no file is opened, no ``.pyc`` is
read or written, whatever ``sys.dont_write_bytecode`` says.  ``a.b`` maps to
``a/b.py`` or, for a package, ``a/b/__init__.py``; the plugin's root folder
is the top package.  Tracebacks show the plugin's lines because the source
is registered in ``linecache`` under a ``<plugin …>`` file name.

``install`` puts the importer first on ``sys.meta_path`` so nothing on disk
can shadow the verified package; ``uninstall`` removes it and drops the
package's modules from ``sys.modules`` and ``linecache``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import linecache
import sys
from collections.abc import Mapping, Sequence
from types import CodeType, ModuleType

__all__ = ["SourceImporter"]


class SourceImporter(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    def __init__(self, package: str, files: Mapping[str, bytes], label: str) -> None:
        self.package = package
        self.label = label
        self._sources = {p: b for p, b in files.items() if p.endswith(".py")}
        self._filenames: set[str] = set()

    # -- finder ----------------------------------------------------------
    def _path_of(self, fullname: str) -> tuple[str, bool] | None:
        if fullname == self.package:
            rel: list[str] = []
        elif fullname.startswith(self.package + "."):
            rel = fullname[len(self.package) + 1:].split(".")
        else:
            return None
        package_init = "/".join([*rel, "__init__.py"])
        if package_init in self._sources:
            return package_init, True
        if rel and "/".join(rel) + ".py" in self._sources:
            return "/".join(rel) + ".py", False
        return None

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        found = self._path_of(fullname)
        if found is None:
            return None
        rel, is_package = found
        spec = importlib.util.spec_from_loader(fullname, self, origin=self._filename(rel),
                                               is_package=is_package)
        assert spec is not None
        spec.has_location = False
        return spec

    # -- loader ----------------------------------------------------------
    def _filename(self, rel: str) -> str:
        return f"<plugin {self.label}>/{rel}"

    def _lookup(self, fullname: str) -> tuple[str, bytes]:
        found = self._path_of(fullname)
        if found is None:
            raise ImportError(f"{fullname} is not part of plugin {self.label}", name=fullname)
        return found[0], self._sources[found[0]]

    def is_package(self, fullname: str) -> bool:
        found = self._path_of(fullname)
        return bool(found and found[1])

    def get_source(self, fullname: str) -> str:
        rel, source = self._lookup(fullname)
        return importlib.util.decode_source(source)

    def get_code(self, fullname: str) -> CodeType:
        rel, source = self._lookup(fullname)
        filename = self._filename(rel)
        text = importlib.util.decode_source(source)
        linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
        self._filenames.add(filename)
        return compile(source, filename, "exec", dont_inherit=True)

    def exec_module(self, module: ModuleType) -> None:
        code = self.get_code(module.__name__)
        exec(code, module.__dict__)  # noqa: S102 - this is the loader: verified source only

    # -- lifetime ----------------------------------------------------------
    def install(self) -> None:
        if any(getattr(f, "package", None) == self.package for f in sys.meta_path):
            raise ImportError(f"an importer for {self.package} is already installed")
        for name in list(sys.modules):
            if name == self.package or name.startswith(self.package + "."):
                raise ImportError(f"{name} is already imported")
        sys.meta_path.insert(0, self)

    def uninstall(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for name in list(sys.modules):
            if name == self.package or name.startswith(self.package + "."):
                del sys.modules[name]
        for filename in self._filenames:
            linecache.cache.pop(filename, None)
        self._filenames.clear()

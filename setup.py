"""Build step: compile the gettext catalogs (.po → .mo) whenever the package is built.

The metadata lives in pyproject.toml; this file only adds ``build_catalogs`` to setuptools'
``build``, so ``pip install .``, ``pip install -e .`` and ``python -m build`` all produce the
compiled catalogs from the committed ``.po`` sources and no binary is ever committed. Babel
(a build requirement) reads and writes the catalogs; the daemon itself reads the ``.mo`` files
with the standard library's ``gettext``.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build

PACKAGE_ROOT = Path("daemon")
LOCALE_DIR = PACKAGE_ROOT / "kakao_tokend" / "locale"


class BuildCatalogs(Command):
    """Compile every ``locale/<lang>/LC_MESSAGES/*.po`` into the ``.mo`` gettext reads.

    Into the build directory for a wheel; in place (next to the ``.po``) for an editable
    install, which imports the package from the source tree.
    """

    description = "compile the gettext catalogs (.po) into .mo files"
    user_options: list[tuple[str, str | None, str]] = []  # noqa: RUF012 - distutils' interface
    editable_mode = False

    def initialize_options(self) -> None:
        self.build_lib: str | None = None

    def finalize_options(self) -> None:
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def _catalogs(self) -> list[Path]:
        return sorted(LOCALE_DIR.glob("*/LC_MESSAGES/*.po"))

    def _target(self, po: Path) -> Path:
        mo = po.with_suffix(".mo")
        if self.editable_mode or self.build_lib is None:
            return mo
        return Path(self.build_lib) / mo.relative_to(PACKAGE_ROOT)

    def run(self) -> None:
        from babel.messages.mofile import write_mo
        from babel.messages.pofile import read_po

        for po in self._catalogs():
            with po.open("rb") as source:
                catalog = read_po(source, abort_invalid=True)
            target = self._target(po)
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as compiled:
                write_mo(compiled, catalog, use_fuzzy=False)
            self.announce(f"compiled {po} -> {target}", level=2)

    # setuptools' protocol for build steps that editable installs also run.
    def get_outputs(self) -> list[str]:
        return [str(self._target(po)) for po in self._catalogs()]

    def get_source_files(self) -> list[str]:
        return [str(po) for po in self._catalogs()]

    def get_output_mapping(self) -> dict[str, str]:
        return {}  # the .mo files are generated, not copies of a source file


class Build(build):
    """setuptools' build plus the catalogs."""

    sub_commands = [*build.sub_commands, ("build_catalogs", None)]  # noqa: RUF012


setup(cmdclass={"build": Build, "build_catalogs": BuildCatalogs})

"""Build hook: ship ``hf_slnb-autoregister.pth`` so that installing the package registers
``--optim slnb`` with the Hugging Face Trainer (see ``_hf_slnb_autoregister.py``).

All metadata lives in ``pyproject.toml``; this file only adds one build step. A ``.pth`` file must
sit at the top of site-packages, which ``[tool.setuptools]`` cannot express, and it must reach
both kinds of install:

* ``pip install .`` (a regular wheel): the file is written into ``build_lib``, whose whole tree
  becomes the root of the wheel, i.e. site-packages;
* ``pip install -e .`` (a PEP 660 editable wheel): setuptools runs the build steps with
  ``editable_mode`` set and points ``install_lib`` at the unpacked editable wheel, whose every
  file is packed, so the file is written there.

Its name sorts after setuptools' ``__editable__.*.pth``, so in an editable install the module it
imports is already findable when ``site`` runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from setuptools import Command, setup
from setuptools.command.build import build

PTH_NAME = "hf_slnb-autoregister.pth"
PTH_LINE = "import _hf_slnb_autoregister; _hf_slnb_autoregister.install()\n"


class build_pth(Command):
    """Write the auto-registration ``.pth`` file (no-op for the package's own modules)."""

    description = "write the .pth file that registers --optim slnb with transformers"
    user_options: ClassVar[list[tuple[str, str | None, str]]] = []

    def initialize_options(self) -> None:
        self.build_lib: str | None = None
        self.editable_mode = False

    def finalize_options(self) -> None:
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def _path(self) -> Path:
        if self.editable_mode:
            return Path(self.get_finalized_command("install").install_lib, PTH_NAME)
        return Path(str(self.build_lib), PTH_NAME)

    def run(self) -> None:
        path = self._path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(PTH_LINE, encoding="utf-8")

    def get_outputs(self) -> list[str]:
        return [] if self.editable_mode else [str(self._path())]

    def get_output_mapping(self) -> dict[str, str]:
        return {}

    def get_source_files(self) -> list[str]:
        return []


class build_with_pth(build):
    sub_commands: ClassVar = [*build.sub_commands, ("build_pth", None)]


setup(cmdclass={"build": build_with_pth, "build_pth": build_pth})

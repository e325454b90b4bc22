"""Packaging hook: the wheel carries the library, not its tests (the ``*_test.py`` modules)."""

from setuptools import setup
from setuptools.command.build_py import build_py


def is_test_module(module: tuple[str, str, str]) -> bool:
    _package, name, _path = module
    return name.endswith("_test") or name == "conftest"


class BuildWithoutTests(build_py):
    def find_package_modules(self, package, package_dir):
        return [
            module
            for module in super().find_package_modules(package, package_dir)
            if not is_test_module(module)
        ]


setup(cmdclass={"build_py": BuildWithoutTests})

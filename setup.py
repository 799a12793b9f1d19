"""Package discovery for the package-dir mapping in pyproject.toml (the rest of the metadata lives there).

``v4convert`` is assembled from three source folders; every subpackage below them (families/, quant/, export/,
kernels/native/, ...) is found automatically, so a new room installs without editing a list.
"""
from setuptools import find_packages, setup

ROOTS = {"v4convert": "v4convert", "v4convert.runtime": "runtime", "v4convert.formats": "formats"}
PACKAGES = [sub for name, folder in ROOTS.items()
            for sub in [name, *(f"{name}.{p}" for p in find_packages(folder))]]

setup(packages=PACKAGES, package_dir=ROOTS)

"""The package under test is the installed one, not the checkout's source tree by accident.

The source lives in src/, so the checkout's root on sys.path (pytest's pythonpath, for the tests
package and the test project) holds no `django_leakguard` to shadow the installed one. Under tox
the installed package is the wheel tox built; with `make test` it is the editable install of
src/.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import django_leakguard

ROOT = Path(__file__).resolve().parent.parent


def test_the_checkout_root_holds_no_package_to_shadow_the_installed_one() -> None:
    assert not (ROOT / "django_leakguard").exists()
    assert (ROOT / "src" / "django_leakguard" / "__init__.py").is_file()


def test_tox_tests_the_wheel_it_installed() -> None:
    imported = Path(django_leakguard.__file__).resolve()
    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    if os.environ.get("TOX_ENV_DIR"):
        # tox sets TOX_ENV_DIR in its environments; its package is the wheel, installed there.
        assert imported.is_relative_to(site_packages), imported
    else:  # `make test`: the editable install of src/ (or a wheel installed by hand)
        assert imported.is_relative_to(ROOT / "src") or imported.is_relative_to(site_packages)

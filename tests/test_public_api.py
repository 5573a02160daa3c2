"""kasa_trl's public names (``__all__``): each resolves, lazily, to the object its defining module holds."""

import importlib
import subprocess
import sys

import pytest

import kasa_trl


def test_all_lists_exactly_the_lazy_exports():
    assert sorted(kasa_trl.__all__) == sorted(kasa_trl._EXPORTS)
    assert set(kasa_trl.__all__) <= set(dir(kasa_trl))


@pytest.mark.parametrize("name", kasa_trl.__all__)
def test_each_public_name_is_its_module_s_object(name):
    module = importlib.import_module(f"kasa_trl.{kasa_trl._EXPORTS[name]}")
    assert getattr(kasa_trl, name) is getattr(module, name)
    assert getattr(module, name).__module__ == module.__name__  # defined there, not re-exported


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="module 'kasa_trl' has no attribute 'nope'"):
        kasa_trl.nope  # noqa: B018


def test_importing_the_package_loads_no_torch():
    code = "import sys, kasa_trl; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

"""Unit test of the version check a device session makes before anything else."""

from __future__ import annotations

import pytest

from hostkit.errors import ConnectError


def test_version_mismatch_names_both_versions() -> None:
    import tvm

    from hostkit.run.remote import check_versions

    with pytest.raises(ConnectError) as err:
        check_versions("pi4", {"tvm_version": "0.19.0"})
    assert f"host has {tvm.__version__}, device has 0.19.0" in str(err.value)
    assert "edgekit device install --device pi4" in str(err.value)
    check_versions("pi4", {"tvm_version": tvm.__version__})

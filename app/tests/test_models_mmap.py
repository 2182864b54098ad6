"""Model files are mapped read-only and shared (one page-cache copy for all processes)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from xagent import models
from xagent.settings import ModelSpec


def test_present_models_are_mapped_read_only_and_missing_ones_skipped(tmp_path: Path) -> None:
    data = os.urandom(64 * 1024 + 7)
    specs = [
        ModelSpec(name=name, url=f"file:///{name}", sha256=hashlib.sha256(data).hexdigest())
        for name in ("a.bin", "missing.bin")
    ]
    models.paths_for(tmp_path, specs[0]).final.write_bytes(data)
    settings = cast(Any, SimpleNamespace(models=specs, models_dir=tmp_path))
    maps = models.map_all(settings)
    try:
        assert len(maps) == 1
        assert maps[0][:] == data
        with pytest.raises(TypeError):
            maps[0][0] = 0  # PROT_READ: the page cache copy cannot be changed
    finally:
        for m in maps:
            m.close()

"""The leaf modules that give each shared fact one home: atomic writes (`vistune.files`), the pad colour
(`vistune.images`), and the token values (`vistune.tokens`), which the tokenizer layer must reach without
importing torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import vistune
from vistune.files import replacing, replacing_folder, write_text
from vistune.images import pad_colour


def test_write_text_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "results.json"  # the folder is created
    write_text(path, "old")
    assert write_text(path, "néw") == path
    assert path.read_text(encoding="utf-8") == "néw"
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path: Path) -> None:
    path = tmp_path / "report.png"
    path.write_text("old")
    with pytest.raises(RuntimeError), replacing(path) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png"  # a writer that picks its format by suffix
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.png"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    dst = tmp_path / "step-000002"
    with replacing_folder(dst, prefix=".tmp-") as tmp:
        assert tmp.name.startswith(".tmp-") and tmp.parent == tmp_path
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), replacing_folder(dst) as tmp:
        (tmp / "b").write_text("2")
        raise RuntimeError("killed mid-save")
    assert [p.name for p in tmp_path.iterdir()] == ["step-000002"]
    assert [p.name for p in dst.iterdir()] == ["a"]
    with replacing_folder(dst) as tmp:
        (tmp / "c").write_text("3")
    assert [p.name for p in dst.iterdir()] == ["c"]


def test_pad_colour_truncates_the_mean_as_llava_does() -> None:
    clip = SimpleNamespace(image_mean=[0.48145466, 0.4578275, 0.40821073])  # x 255 = 122.77, 116.75, 104.09
    assert pad_colour(clip) == (122, 116, 104)
    assert pad_colour(SimpleNamespace()) == (127, 127, 127)  # no mean: 0.5


def test_the_tokenizer_layer_does_not_import_torch() -> None:
    code = "import sys, vistune.chat.encode; print('torch' in sys.modules, 'vistune.model.vlm' in sys.modules)"
    src = str(Path(vistune.__file__).resolve().parents[1])  # this checkout's vistune, not another install's
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["False", "False"]

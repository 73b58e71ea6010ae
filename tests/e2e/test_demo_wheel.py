"""The demo's run configs are package data: a wheel built from the sources (pip wheel, in a subprocess) holds them."""

from __future__ import annotations

from pathlib import Path


def test_the_demo_configs_ship_in_the_wheel(tmp_path: Path) -> None:
    """`vistune demo` finds its run configs inside the installed package, not in a source checkout's
    configs/ folder: a wheel built from the sources holds them where `CONFIG_DIR` points."""
    import shutil
    import subprocess
    import sys
    import zipfile

    from vistune.demo.pipeline import CONFIG_DIR, LLMS

    root = Path(__file__).resolve().parents[2]
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, tmp_path / name)
    shutil.copytree(root / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(tmp_path),
                    "-w", str(tmp_path / "dist")], check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("vistune-*.whl")
    inside = CONFIG_DIR.relative_to(Path(__import__("vistune").__file__).parent).as_posix()
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {f"vistune/{inside}/{llm}.yaml" for llm in LLMS} <= names

"""A built wheel carries everything the service needs outside a checkout: the dashboard's templates (a
top-level directory of the repository) and static files."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds and installs a wheel

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_templates_where_the_dashboard_finds_them(tmp_path: Path) -> None:
    # Built from a copy of what the build reads, so setuptools' build/ never lands in the checkout.
    source = tmp_path / "source"
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    for name in ("gateway", "templates"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(source)],
                   check=True, timeout=600, capture_output=True)
    wheel = next(dist.glob("llm_gateway-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)  # its own pip (ensurepip, offline): this environment is left alone
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=300, capture_output=True)
    # The package from the wheel, its dependencies from this environment (PYTHONPATH comes first, but only
    # site dirs process .pth files, so the editable install of this checkout is not seen).
    probe = ("import gateway, gateway.http.dashboard as d; "
             "print(gateway.__file__); print(d.TEMPLATES_DIR); print(d.STATIC_DIR)")
    out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env={"PYTHONPATH": ":".join(site.getsitepackages())}).stdout.split()
    package, templates, static = (Path(x) for x in out)
    assert package.is_relative_to(env_dir), package
    assert templates == env_dir / "share" / "llm-gateway" / "templates"
    assert {p.name for p in templates.iterdir()} == {p.name for p in (ROOT / "templates").glob("*.html")}
    assert static.is_relative_to(env_dir), static
    shipped = {p.name for p in (ROOT / "gateway" / "static").iterdir() if p.suffix in (".css", ".js")}
    assert shipped and {p.name for p in static.iterdir()} >= shipped

"""Static checks of the project image (no Docker engine here): base pinned, non-root, installs the copied tree,
no credentials, build context limited by .dockerignore."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY|API_KEY|CREDENTIAL)", re.I)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return out


def of(kind: str) -> list[str]:
    return [args for word, args in instructions() if word == kind]


def test_base_image_is_pinned_and_cuda_capable() -> None:
    froms = of("FROM")
    assert len(froms) == 1
    image = froms[0].split()[0]
    name, _, tag = image.partition(":")
    assert name in {"nvidia/cuda", "pytorch/pytorch"}
    assert "@sha256:" in image or re.match(r"^\d+\.\d+(\.\d+)?-", tag), f"base image not pinned: {image}"
    assert "latest" not in tag


def test_runs_as_a_non_root_user_with_an_entrypoint() -> None:
    users = of("USER")
    assert users, "no USER: the image would run as root"
    last = users[-1].split(":")[0]
    assert last not in {"root", "0"}
    # The user is created, and nothing is installed after switching to it.
    words = [w for w, _ in instructions()]
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")
    assert any("useradd" in r and (last in r) for r in of("RUN"))
    entry = json.loads(of("ENTRYPOINT")[0])
    assert entry == ["icmil"]  # exec form: signals reach the process


def test_installs_the_project_from_the_copied_tree() -> None:
    copies = [shlex.split(c) for c in of("COPY")]
    copied = {src for c in copies for src in c[:-1] if not src.startswith("--")}
    assert {"icmil", "components", "pipelines", "pyproject.toml"} <= copied
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    runs = of("RUN")
    install = [r for r in runs if re.search(r"pip install \.(\s|$)", r)]
    assert install, "the project must be installed from the copied tree (pip install .)"
    assert not any(re.search(r"pip install [^.]*\bicmil\b", r) for r in runs)
    # torch is pinned to the same versions as the bootstrap script
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text(encoding="utf-8")
    args = dict(a.split("=", 1) for a in of("ARG") if "=" in a)
    assert f"torch=={args['TORCH_VERSION']}" in bootstrap
    assert f"torchvision=={args['TORCHVISION_VERSION']}" in bootstrap
    assert any("openslide" in r for r in runs)  # openslide-bin comes with the project: import check
    # The Kubeflow layer is installed under icmil_kfp (never as top-level `components` / `pipelines`).
    checks = [r for r in runs if "python -c" in r and "import" in r]
    assert checks and all("icmil_kfp.components" in r and "icmil_kfp.pipelines" in r for r in checks)
    assert not any(re.search(r"import[^;]*\b(?<!\.)(components|pipelines)\b", r) for r in checks)


def test_no_credentials_in_the_image() -> None:
    for word, args in instructions():
        if word in {"ENV", "ARG", "LABEL"}:
            for token in shlex.split(args):
                key = token.split("=", 1)[0]
                assert not SECRET_NAME.search(key), (
                    f"{word} {key}: credentials must come from Kubernetes Secrets"
                )
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", text), "URL with a password in the Dockerfile"
    assert not any(("secret" in c.lower() or ".env" in c) for c in of("COPY"))


def _ignored(rel: str, patterns: list[str]) -> bool:
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat[1:] if neg else pat
        pat = pat.rstrip("/")
        hit = (
            fnmatch.fnmatch(rel, pat)
            or fnmatch.fnmatch(rel, f"{pat}/*")
            or (pat.startswith("**/") and any(fnmatch.fnmatch(part, pat[3:]) for part in rel.split("/")))
        )
        if hit:
            ignored = not neg
    return ignored


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        (".venv/bin/python", True),
        (".git/config", True),
        ("runs/demo/mlflow.db", True),
        ("mlflow.db", True),
        ("k8s/secrets/icmil-s3.yaml", True),
        ("tests/conftest.py", True),
        ("icmil/__pycache__/x.pyc", True),
        (".env", True),
        ("icmil/config.py", False),
        ("components/tile.py", False),
        ("pipelines/runner.py", False),
        ("pyproject.toml", False),
    ],
)
def test_dockerignore_keeps_the_context_to_what_is_copied(path: str, ignored: bool) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert _ignored(path, patterns) == ignored

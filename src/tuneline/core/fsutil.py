"""Small file-system helpers: atomic writes, links, safe names, digests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator

_CHUNK = 1 << 20
_UMASK = os.umask(0)  # read once at import: os.umask can only be read by setting it
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it into place.

    A killed process leaves at most a `.tmp-*` file that nothing trusts, never a
    half-written `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        # mkstemp makes files 0600; give the result the mode a plain open() would (other users,
        # e.g. a ComfyUI service reading copy_to folders, must be able to read it).
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: the same object always gives the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n")


def digest_json(obj: Any) -> str:
    """sha256 of the canonical JSON form of `obj`: the key of everything that decides a result."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks so memory stays flat."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (free, same bytes); copy where links are not possible."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _staging_dir(final: Path, tag: str) -> Path:
    """A fresh folder beside `final`, with the mode a plain mkdir gives: mkdtemp's 0700 would
    survive the rename and lock other users (a ComfyUI service, a team mate) out of the output."""
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.{tag}-", dir=final.parent))
    os.chmod(staging, 0o777 & ~_UMASK)
    return staging


@contextlib.contextmanager
def rebuilt_dir(final: Path) -> Iterator[Path]:
    """Build a directory under a temporary name, then swap it in for `final`.

    If the body raises or the process dies, the previous `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_dir(final, "new")
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    trash = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, trash)
    os.replace(staging, final)
    shutil.rmtree(trash, ignore_errors=True)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """A folder name made from `name`: no separators, no leading dots, no traversal.

    "My Set/../x" -> "My_Set_.._x" is still unsafe-looking, so runs of dots are
    squeezed and leading dots removed: the result never names a parent folder.
    """
    cleaned = _UNSAFE.sub("_", name.strip())
    cleaned = re.sub(r"\.{2,}", ".", cleaned).strip("._-")
    return cleaned[:100]


# --- settings that become file and folder names --------------------------------------------
# A params value joined into a path must not lead out of the project (`export.name:
# ../../x`). Names of files a stage writes are one name inside its output folder; paths the
# project reads or writes relative to its root stay under the root; destinations the user
# chose on purpose (export.copy_to, a model folder, an MLflow store) stay explicit paths.

FILE_NAME_RULE = ("a file name is one name inside its output folder: no / or \\, no NUL or control characters, "
                  "not '.' or '..', no leading dot, at most 200 bytes")
PROJECT_PATH_RULE = ("a project path is relative to the project root and stays inside it: no absolute path, "
                     "no '..', no leading ~, no \\ (use /), no NUL; symlink a folder into the project to use "
                     "one kept elsewhere")
_MAX_NAME_BYTES = 200  # leaves room for suffixes such as `_lora.safetensors` under the usual 255


def _control_character(text: str) -> str | None:
    if "\x00" in text:
        return "a NUL byte"
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    return None if bad is None else f"the control character {bad!r}"


def file_name_problem(name: str) -> str | None:
    """Why `name` cannot be a file name inside an output folder (naming the rule), or None."""
    control = _control_character(name)
    if control:
        problem = f"has {control}"
    elif "/" in name or "\\" in name:
        separator = "/" if "/" in name else "\\"
        problem = f"has a path separator ({separator})"
    elif not name.strip():
        problem = "is empty"
    elif name in (".", ".."):
        problem = f"is {name!r}, a folder"
    elif name.startswith("."):
        problem = "starts with a dot"
    elif len(name.encode("utf-8")) > _MAX_NAME_BYTES:
        problem = f"is {len(name.encode('utf-8'))} bytes long"
    else:
        return None
    return f"not a file name: it {problem}; {FILE_NAME_RULE}"


def project_path_problem(path: str | Path) -> str | None:
    """Why `path` is not a relative path inside the project (naming the rule), or None. Checked on
    the text, not the disk: a symlink inside the project may point anywhere, on purpose."""
    text = str(path)
    control = _control_character(text)
    if control:
        problem = f"has {control}"
    elif "\\" in text:
        problem = "has a backslash"
    elif text.startswith("~"):
        problem = "starts with ~ (a home folder)"
    elif Path(text).is_absolute():
        problem = "is an absolute path"
    elif ".." in Path(text).parts:
        problem = "has a '..' component"
    else:
        return None
    return f"not a path inside the project: it {problem}; {PROJECT_PATH_RULE}"


def chosen_path_problem(path: str | Path) -> str | None:
    """Why `path`, a destination or source the user may choose anywhere on purpose, is no path."""
    return "not a path: it has a NUL byte, which no file name can hold" if "\x00" in str(path) else None


def _rule(check: Callable[[Any], str | None]) -> AfterValidator:
    def validate(value: Any) -> Any:
        problem = check(value)
        if problem:
            raise ValueError(problem)
        return value

    return AfterValidator(validate)


# Field types of the params sections (pydantic): the value is refused with the rule named.
FileName = Annotated[str, _rule(file_name_problem)]  # export.name: export/<name>.safetensors
ProjectPath = Annotated[Path, _rule(project_path_problem)]  # store_dir, datasets[].path
ProjectFile = Annotated[str, _rule(project_path_problem)]  # render.prompts_file
ChosenPath = Annotated[Path, _rule(chosen_path_problem)]  # export.copy_to: anywhere, on purpose
ChosenReference = Annotated[str, _rule(chosen_path_problem)]  # model folders, MLflow stores, hub ids


def relative_to_root(path: Path, root: Path) -> str:
    """A posix path relative to `root` when inside it, else absolute: what manifests record."""
    # abspath, not resolve: a symlinked data set keeps its path under the project.
    path = Path(os.path.abspath(path))
    try:
        return path.relative_to(os.path.abspath(root)).as_posix()
    except ValueError:
        return path.as_posix()


def build_folder_once(final: Path, build: Callable[[Path], None], is_complete: Callable[[Path], bool]) -> Path:
    """Return `final`, building it first when `is_complete(final)` is false.

    `build(staging)` fills a temp folder beside `final` and must write its completion
    marker last; the folder gets its final name by an atomic rename, under a lock, so a
    killed or concurrent build never leaves a folder that `is_complete` trusts.
    """
    from tuneline.core.lock import exclusive

    final = Path(final)
    if is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # Builders of one folder take turns (flock: a killed holder releases it).
    with exclusive(final.parent / f".{final.name}.lock", f"building {final.name}", wait=True):
        if is_complete(final):  # another process built it while we waited
            return final
        for leftover in final.parent.glob(f".{final.name}.tmp-*"):  # no other builder runs: left by a kill
            shutil.rmtree(leftover, ignore_errors=True)
        if final.exists():  # no completion marker: not made by this code, do not trust it
            shutil.rmtree(final, ignore_errors=True)
        staging = _staging_dir(final, "tmp")
        try:
            build(staging)
            if not is_complete(staging):
                raise RuntimeError(f"building {final.name} did not finish {staging}")
            try:
                os.rename(staging, final)
            except OSError:
                if not is_complete(final):  # a builder that ignored the lock won (shared storage): as good
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final

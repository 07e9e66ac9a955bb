"""``export_tasks``: vtprune's mini tasks as a folder that lmms-eval's own CLI reads with ``--include_path``.

The YAMLs in ``vtprune/eval/tasks/`` carry a placeholder ``dataset_path``: vtprune's runner fills it in with the
folder that ``vtprune.eval.mini`` generates. lmms-eval's CLI knows nothing of that, so an export writes, for each
task, that YAML with the shared template written into it and ``dataset_path`` set to a copy of the generated data.

The data is copied into the export (``data/``, under 200 KB for all three tasks) rather than pointed at in
``$VTPRUNE_CACHE``: the export keeps working after the cache is cleared, when ``VTPRUNE_CACHE`` differs at run time,
and after a new ``MINI_VERSION`` moves the cache to a new folder. ``dataset_path`` is an absolute path, as lmms-eval
opens it from the working directory; after moving the folder, run the export again.

The task names stay vtprune's (``vtprune_textvqa_mini``): lmms-eval's own index, which wins over ``--include_path``
on a clash, has no task of that name.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

RECORD = "vtprune-export.json"  # what an export wrote; its presence marks a folder that a new export may replace
DATA = "data"
TEMPLATE = "_default_template_vtprune_mini_yaml"
_EXPORTED_BY = "vtprune tasks export"


def mini_task_names(tasks=None) -> list[str]:
    """The mini tasks to export, in the order given, each once; all of them when ``tasks`` is None."""
    from vtprune.errors import VtpruneError
    from vtprune.eval.mini import MINI_TASKS

    if tasks is None:
        return list(MINI_TASKS)
    names = list(dict.fromkeys(tasks))
    for name in names:
        if name not in MINI_TASKS:
            raise VtpruneError(f"unknown mini task '{name}' (allowed: {', '.join(MINI_TASKS)})")
    if not names:
        raise VtpruneError(f"no task named (allowed: {', '.join(MINI_TASKS)})")
    return names


def check_export_folder(folder: str | Path) -> None:
    """``folder`` must be new, empty, or an earlier export holding only what that export wrote."""
    from vtprune.errors import VtpruneError

    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise VtpruneError(f"{folder} is a file, not a folder (allowed: a new or empty folder, or an earlier export)")
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return
    written = _recorded_files(folder)
    if written is None:
        raise VtpruneError(f"{folder} is not empty and is not an earlier export of `{_EXPORTED_BY}` (allowed: a new "
                           "or empty folder, or an earlier export, which is replaced)")
    others = [name for name in entries if name not in written]
    if others:
        raise VtpruneError(f"{folder} is an earlier export but also holds {', '.join(others[:5])}, which the export "
                           "did not write and would delete (allowed: a new or empty folder, or an earlier export "
                           "holding only its own files)")


def export_tasks(folder: str | Path, tasks=None) -> list[Path]:
    """Write the task YAMLs of ``tasks`` (default: every mini task) and their data into ``folder``; return the YAMLs.

    The export is built in a hidden folder beside ``folder`` and renamed into place, so ``folder`` never holds half an
    export. An earlier export there is replaced as a whole: ``folder`` afterwards holds exactly the tasks asked for.
    The data is generated first when vtprune's cache lacks it.
    """
    from vtprune.models.tiny import _honour_umask, _remove

    names = mini_task_names(tasks)
    check_export_folder(folder)
    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_killed_exports(folder)
    prefix = f".{folder.name}.export-{os.getpid()}@{socket.gethostname()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=folder.parent))
    try:
        written = [_write_task(name, tmp, folder) for name in names]
        record = {"exported_by": _EXPORTED_BY, "vtprune_version": _version(), "tasks": names,
                  "files": sorted([*(p.name for p in tmp.iterdir()), RECORD])}
        (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
        _honour_umask(tmp)
        _move_into_place(tmp, folder)
    except BaseException:
        _remove(tmp)
        raise
    return [folder / p.name for p in written]


def _write_task(name: str, tmp: Path, folder: Path) -> Path:
    """Copy the task's data into ``tmp/data/`` and write its YAML into ``tmp``, naming the data where ``folder`` will
    hold it."""
    import yaml

    from vtprune.eval.mini import mini_dataset_path
    from vtprune.eval.runner import JUDGE_TASKS, TASKS_DIR

    source = mini_dataset_path(name)
    shutil.copytree(source, tmp / DATA / source.name)
    data = folder / DATA / source.name

    text = (TASKS_DIR / f"{name}.yaml").read_text()
    include = f"include: {TEMPLATE}\n"
    if text.count(include) != 1:
        raise RuntimeError(f"{TASKS_DIR / name}.yaml does not include {TEMPLATE} once")
    settings = yaml.safe_load((TASKS_DIR / TEMPLATE).read_text())
    settings["dataset_path"] = str(data)
    header = (f"# Written by `{_EXPORTED_BY}` (vtprune {_version()}) from vtprune/eval/tasks/{name}.yaml and its\n"
              f"# {TEMPLATE}. dataset_path is the copy of the generated data in {DATA}/{source.name}/ here,\n"
              "# named by its absolute path: after moving this folder, run the export again.\n")
    if name in JUDGE_TASKS:
        header += ("# Under lmms-eval's own CLI this task calls the GPT judge (OPENAI_API_KEY); without a key every\n"
                   "# review fails and lmms-eval still prints gpt_eval numbers, which are not scores.\n")
    text = header + text.replace(include, yaml.safe_dump(settings, sort_keys=False))
    path = tmp / f"{name}.yaml"
    path.write_text(text)
    _check_written(path, name, data)
    return path


def _check_written(path: Path, name: str, data: Path) -> None:
    """The written YAML reads back as the task, with its data where lmms-eval will look (``!function`` tags kept as
    text: importing the task functions is lmms-eval's business)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    config = yaml.load(path.read_text(), Loader=Loader)  # a SafeLoader subclass
    wanted = {"task": name, "dataset_path": str(data), "dataset_kwargs": {"load_from_disk": True}}
    got = {key: config.get(key) for key in wanted}
    if got != wanted or "include" in config:
        raise RuntimeError(f"{path.name}: the exported YAML reads back as {got}, not {wanted}")


def _move_into_place(tmp: Path, folder: Path) -> None:
    """Rename ``tmp`` to ``folder``; an empty folder or earlier export there is moved aside first and removed after
    (rename cannot replace a folder that has files), and put back if the rename fails."""
    from vtprune.models.tiny import _remove

    if not (folder.exists() or folder.is_symlink()):
        tmp.rename(folder)
        return
    old = tmp.with_name(tmp.name + "-old")
    folder.rename(old)
    try:
        tmp.rename(folder)
    except BaseException:
        old.rename(folder)
        raise
    _remove(old)


def _remove_killed_exports(folder: Path) -> None:
    """Remove the hidden build folders that killed exports to ``folder`` left beside it: only those named by
    ``export_tasks`` for this folder, made on this machine by a process that is gone."""
    from vtprune.models.tiny import _alive, _remove

    pattern = re.compile(rf"\.{re.escape(folder.name)}\.export-(\d+)@(.+)-[a-z0-9_]{{8}}(-old)?")
    host = socket.gethostname()
    for path in folder.parent.glob(f".{glob.escape(folder.name)}.export-*"):
        match = pattern.fullmatch(path.name)
        if match and match[2] == host and not _alive(int(match[1])):
            _remove(path)


def _recorded_files(folder: Path) -> set[str] | None:
    """The top-level names an earlier export recorded in ``folder``, None when it holds no readable record."""
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("exported_by") != _EXPORTED_BY:
        return None
    files = record.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return set(files)


def _version() -> str:
    from vtprune import __version__

    return __version__

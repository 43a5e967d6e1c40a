"""Where a merge may write: the checks :func:`~mergeforge.engine.run_merge` makes before it reads
any tensor, so that a merge can never damage its inputs or a folder it does not own.

1. :func:`check_output_location` (before the inputs are opened; touches nothing): the
   nearest existing folder on the output's path is a folder we may write in (missing folders
   on the way are created later, like ``mkdir -p``).
2. :func:`check_not_an_input` (once the inputs are open, before statistics passes or tensor
   reads): the output is not, does not lie inside and does not contain any path the merge
   reads (:func:`input_paths`), after resolving symlinks and relative paths, whatever
   ``overwrite`` says.
3. :func:`check_replaceable`: the output is absent, an empty folder, or, with ``overwrite``, a
   previous mergeforge output (:func:`is_previous_output`: the marker files, and nothing a merge
   does not write, so files added later are never deleted); never a file or another folder.
   Fusion (``mergeforge fuse``, :mod:`mergeforge.fusion.output`) applies the same rules with its
   own files (the ``markers``/``written``/``producer`` arguments) and inputs
   (:func:`check_not_among`).
4. :func:`~mergeforge.checkpoint._staging.probe_writable`: an empty folder is created and
   removed where the staging folder will go (read-only file systems, immutable folders, root).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from mergeforge.checkpoint import Checkpoint
from mergeforge.checkpoint._staging import nearest_existing
from mergeforge.errors import CheckpointError, ConfigError

INDEX = "model.safetensors.index.json"
MARKERS = ("mergeforge_config.yml", INDEX)
"""Files every output of :func:`~mergeforge.engine.run_merge` has."""


WRITTEN = ("mergeforge_resolved.yml", "README.md")
"""Files :func:`~mergeforge.engine.run_merge` writes besides :data:`MARKERS`, the shards and
:data:`~mergeforge.checkpoint.CARRIED_FILES` (``config.json`` among them)."""


def foreign_files(
    folder: Path,
    *,
    markers: tuple[str, ...] = MARKERS,
    written: tuple[str, ...] = WRITTEN,
    carried: bool = True,
) -> list[str]:
    """The entries of ``folder`` (paths relative to it, sorted) that a mergeforge merge does not
    write: anything but the shards its ``model.safetensors.index.json`` names, that index,
    :data:`MARKERS`, :data:`WRITTEN` and the carried files (``markers``/``written``: another
    producer's files, e.g. fusion's; ``carried=False``: a producer that never copies
    :data:`~mergeforge.checkpoint.CARRIED_FILES`, such as fusion, so a tokenizer or generation
    config found there is someone else's). Symbolic links count as foreign (a merge writes plain
    files); an unreadable index names no shards."""
    from mergeforge.checkpoint import CARRIED_FILES

    ours = {*markers, *written, *(CARRIED_FILES if carried else ())}
    try:
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        ours.update(str(v) for v in index["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    dirs = {str(Path(p).parent) for p in ours} - {"."}
    dirs |= {str(parent) for d in dirs for parent in Path(d).parents} - {"."}
    foreign: list[str] = []

    def unreadable(e: OSError) -> None:  # its contents are unknown: not ours to delete
        foreign.append(os.path.relpath(e.filename, folder))

    for root, subdirs, files in os.walk(folder, onerror=unreadable):
        rel = Path(root).relative_to(folder)
        walked = []
        for name in subdirs:
            p = rel / name
            if str(p) in dirs and not (folder / p).is_symlink():
                walked.append(name)
            else:
                foreign.append(str(p))
        subdirs[:] = walked
        foreign += [
            str(rel / n)
            for n in files
            if str(rel / n) not in ours or (folder / rel / n).is_symlink()
        ]
    return sorted(foreign)


def is_previous_output(
    folder: Path,
    *,
    markers: tuple[str, ...] = MARKERS,
    written: tuple[str, ...] = WRITTEN,
    carried: bool = True,
) -> bool:
    """True if ``folder`` holds a previous mergeforge merge output (all of :data:`MARKERS`) and
    nothing a merge does not write (:func:`foreign_files`, with its ``carried``)."""
    return all((folder / m).is_file() for m in markers) and not foreign_files(
        folder, markers=markers, written=written, carried=carried
    )


def _nonempty(folder: Path) -> bool:
    try:
        return any(folder.iterdir())
    except OSError as e:
        raise CheckpointError(
            f"output folder {str(folder)!r} cannot be listed ({e.strerror}); choose an output "
            "folder you can read and write."
        ) from None


def check_output_location(out: Path) -> None:
    """Refuse an output whose nearest existing folder on its path is a file or not writable
    for us (``os.access``). Touches nothing."""
    where = nearest_existing(out.parent)
    if not where.is_dir():
        raise CheckpointError(
            f"cannot write the output {str(out)!r}: {where} is a file, not a folder; choose an "
            "output path whose parent folders are folders."
        )
    if not os.access(where, os.W_OK | os.X_OK):
        why = "permission denied in"
        try:
            if os.statvfs(where).f_flag & os.ST_RDONLY:
                why = "read-only file system at"
        except OSError:
            pass
        raise CheckpointError(
            f"cannot write the output {str(out)!r}: {why} {where}; choose an output folder "
            f"you can write to, or fix the permissions of {where}."
        )


def check_replaceable(
    out: Path,
    *,
    overwrite: bool,
    markers: tuple[str, ...] = MARKERS,
    written: tuple[str, ...] = WRITTEN,
    producer: str = "merge",
    carried: bool = True,
) -> None:
    """Refuse an output path that is a file, or a non-empty folder without ``overwrite`` or
    that is not a previous mergeforge output (``markers``/``written``/``producer``/``carried``:
    another producer's output, e.g. ``"fusion"``'s, see :func:`foreign_files`). Touches
    nothing."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output path {str(out)!r} exists and is not a folder")
    if not (out.is_dir() and _nonempty(out)):
        return
    if not overwrite:
        raise CheckpointError(
            f"output folder {str(out)!r} exists and is not empty; pass --overwrite "
            "(overwrite=True) to replace it, or choose another folder"
        )
    kind = {"markers": markers, "written": written, "carried": carried}
    if all((out / m).is_file() for m in markers) and (extra := foreign_files(out, **kind)):
        shown = ", ".join(extra[:10]) + (f" and {len(extra) - 10} more" if len(extra) > 10 else "")
        raise CheckpointError(
            f"output folder {str(out)!r} is a previous mergeforge output but holds files a "
            f"{producer} did not write: {shown}; --overwrite would delete them, so nothing in it "
            "was touched. Move them away or choose another output folder."
        )
    if not is_previous_output(out, **kind):
        raise CheckpointError(
            f"output folder {str(out)!r} is not empty and is not a previous mergeforge output "
            f"(it lacks {' or '.join(markers)}); --overwrite only replaces an earlier "
            f"{producer}'s output or an empty folder, so nothing in it was touched. Choose "
            "another output folder, or move it away yourself."
        )


def checkpoint_paths(ck: Checkpoint) -> Iterator[Path]:
    """Every file and folder an opened checkpoint reads: its folder, each file its tensors
    come from, its carried files (config, tokenizer) and, for ``BASE+ADAPTER``, the adapter folder
    and files plus the base's paths. A new kind of composite source must be added here."""
    from mergeforge.checkpoint.lora import LoraSource

    if ck.folder is not None:
        yield Path(ck.folder)
    src = ck.source
    if isinstance(src, LoraSource):  # its parts are private to it; read them here only
        yield from checkpoint_paths(src._base)
        yield src._folder
        yield Path(src._adapter.path)
        for name in src._adapter.keys():
            yield Path(src._adapter.info(name).file)
    else:
        yield Path(src.path)  # a file, or a shard index
    for name in ck.keys():
        yield Path(ck.info(name).file)
    yield from ck.carried_files


def input_paths(plan) -> Iterator[tuple[str, Path]]:
    """``(input as named in the config, path)`` for every path the merge reads: each model's
    :func:`checkpoint_paths`, the statistics files of methods that use them, and the folder of
    a ``tokenizer_source`` that is not merged (``tokenizer_source: PATH``)."""
    for name, ck in zip(plan.models, plan.checkpoints, strict=True):
        for p in checkpoint_paths(ck):
            yield name, p
    for (model, kind), f in plan.sidecars.items():
        yield f"{plan.models[model]} ({kind} statistics)", Path(f.path)
    vocab = getattr(plan, "vocab", None)
    if vocab is not None and vocab.source_folder is not None:
        yield f"tokenizer_source: {vocab.source_name}", Path(vocab.source_folder)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _chain(path: Path) -> list[tuple[Path, tuple[int, int] | None]]:
    """``path`` (symlinks resolved) and each of its ancestors, with their file identity."""
    real = Path(os.path.realpath(path))
    return [(p, _identity(p)) for p in (real, *real.parents)]


def _same(a: tuple[Path, tuple[int, int] | None], b: tuple[Path, tuple[int, int] | None]) -> bool:
    # the resolved path, or the same inode (a bind mount or a second mount of one folder)
    return a[0] == b[0] or (a[1] is not None and a[1] == b[1])


def check_not_an_input(out: Path, plan) -> None:
    """Refuse (:class:`ConfigError`) an output that is, lies inside or contains any input path,
    naming the input and the output."""
    check_not_among(out, input_paths(plan))


def check_not_among(
    out: Path, inputs: Iterable[tuple[str, Path]], *, producer: str = "merge"
) -> None:
    """Refuse (:class:`ConfigError`) an output that is, lies inside or contains any of the
    ``(name, path)`` inputs (symlinks and relative paths resolved; a second mount of one folder
    counts as the same), naming the input and the output."""
    out_chain = _chain(out)
    seen: set[Path] = set()
    for name, path in inputs:
        if path in seen:
            continue
        seen.add(path)
        in_chain = _chain(path)
        if _same(out_chain[0], in_chain[0]):
            how = "is"
        elif any(_same(a, in_chain[0]) for a in out_chain[1:]):
            how = "lies inside"
        elif any(_same(out_chain[0], a) for a in in_chain[1:]):
            how = "contains"
        else:
            continue
        where = "" if str(path) == name else f" ({path})"
        raise ConfigError(
            f"output folder {str(out)!r} {how} the input {name!r}{where}: a {producer} never "
            "writes into, over or around its inputs, with or without --overwrite. Nothing was "
            "written; choose an output folder outside every input model, adapter and "
            f"{'statistics' if producer == 'merge' else 'data'} folder."
        )

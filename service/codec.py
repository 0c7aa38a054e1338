"""The stream entry format: what producers XADD and what the worker decodes.

An entry on ``np:{model}:samples`` is a flat Redis hash of fields, writable from any client:

==========  ==================================================================================
field       value
==========  ==================================================================================
``x``       the features as a JSON array of numbers (nested arrays allowed for images; they are
            flattened in C order), e.g. ``[0.1, 2, -3.5]``
``xb``      *instead of* ``x``: the features as raw little-endian float32 bytes (4 bytes each)
``y``       the label: a class index ``0..K-1`` for classification (``3`` or ``"3"``); a number,
            or a JSON array of ``num_targets`` numbers, for regression. A model with ``classes``
            or ``open_classes`` takes its users' own labels: an integer (``3``), a JSON string
            (``"\"cat\""``) or a bare word as redis-cli writes it (``cat``); ``3`` is the
            integer label, ``"\"3\""`` the string label "3"
``id``      optional: the producer's own id for the sample (kept in dead letters)
==========  ==================================================================================

For example, from the shell::

    redis-cli XADD 'np:{default}:samples' '*' x '[0,0,5,13,9,1,...]' y 3

Anything else is ignored. An entry that fails validation never reaches the model: the worker
moves it to ``np:{model}:dead`` with one of :data:`REASONS` and a human-readable detail.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .settings import MAX_LABEL_LENGTH, ModelConfig, label_key

__all__ = ["REASONS", "DecodeError", "Sample", "EntryCodec"]

#: Why an entry was dead-lettered (the ``reason`` label of the dead-letter metric).
REASONS: tuple[str, ...] = (
    "oversized",
    "missing_x",
    "bad_x",
    "wrong_length",
    "nonfinite",
    "missing_label",
    "bad_label",
    "label_out_of_range",
    "unknown_label",
    "too_many_classes",
)


_NONFINITE_X = ("features must be finite float32 numbers (no NaN, Infinity or values beyond "
                "3.4e38)")


class DecodeError(ValueError):
    """A malformed entry. ``reason`` is one of :data:`REASONS`; ``detail`` explains it."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Sample:
    """A validated sample: ``x`` float32 of shape ``(num_features,)``; ``y`` an int class index,
    a user label (int or str: models with ``classes``/``open_classes``; the worker maps it to
    a unit) or a float32 array of ``num_targets`` values."""

    x: np.ndarray
    y: int | str | np.ndarray


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8")
    return str(value)


def _field(fields: Mapping[Any, Any], name: str) -> Any:
    if name in fields:
        return fields[name]
    return fields.get(name.encode())


class EntryCodec:
    """Encode and validate stream entries for one model.

    Args:
        config: the model's configuration (feature count, task, classes/targets).
        max_entry_bytes: entries larger than this (all fields together) are refused as
            ``oversized`` before any parsing; default ``1024 + 32 * num_features``.
    """

    def __init__(self, config: ModelConfig, max_entry_bytes: int | None = None) -> None:
        self.config = config
        self.num_features = config.num_features
        self.classification = config.task == "classification"
        self.max_entry_bytes = max_entry_bytes or 1024 + 32 * self.num_features
        #: "indices" (class indices), "listed" or "open" (user labels; see ModelConfig).
        self.label_set = config.label_set if self.classification else "indices"
        listed = config.classes if self.label_set == "listed" else None
        self._listed = {label_key(c) for c in listed} if listed is not None else None

    # -- encoding ---------------------------------------------------------------------------
    def encode(self, x: Sequence[float] | np.ndarray, y: int | float | Sequence[float],
               binary: bool = True, sample_id: str | None = None) -> dict[str, bytes]:
        """Fields for XADD. Validates first: a sample that would be dead-lettered raises."""
        try:
            arr = np.asarray(x, dtype=np.float64)
        except OverflowError:  # an integer beyond float64
            raise DecodeError("nonfinite", _NONFINITE_X) from None
        arr = self.validate_x(arr)
        label = self.validate_y(y)
        fields: dict[str, bytes] = {}
        if binary:
            fields["xb"] = arr.astype("<f4").tobytes()
        else:
            fields["x"] = json.dumps(arr.tolist()).encode()
        if isinstance(label, (int, str)):
            fields["y"] = (str(label) if isinstance(label, int) else json.dumps(label)).encode()
        else:
            fields["y"] = json.dumps(label.tolist()).encode()
        if sample_id is not None:
            fields["id"] = sample_id.encode()
        return fields

    # -- validation -------------------------------------------------------------------------
    def validate_x(self, arr: np.ndarray) -> np.ndarray:
        if arr.dtype.kind not in "iuf":
            raise DecodeError("bad_x", "features must be numbers")
        arr = arr.reshape(-1)
        if arr.size != self.num_features:
            raise DecodeError("wrong_length",
                              f"expected {self.num_features} features, got {arr.size}")
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, refused
            out = arr.astype(np.float32)
        if not np.isfinite(out).all():
            raise DecodeError("nonfinite", _NONFINITE_X)
        return out

    def validate_y(self, y: Any) -> int | str | np.ndarray:
        if self.classification and self.label_set != "indices":
            label = _user_label(y)
            if self._listed is not None and label_key(label) not in self._listed:
                raise DecodeError("unknown_label", f"label {label!r:.80} is not one of the "
                                                   "model's classes")
            return label
        if self.classification:
            label = _integer(y, "label must be a class index")
            if not 0 <= label < self.config.num_classes:
                raise DecodeError("label_out_of_range", f"label {_short(label)} is outside "
                                                        f"0..{self.config.num_classes - 1}")
            return label
        try:
            values = np.asarray(y, dtype=np.float64).reshape(-1)
        except OverflowError:  # an integer beyond float64
            raise DecodeError("nonfinite", "regression targets must be finite") from None
        except (TypeError, ValueError):
            values = None
        # numpy also takes strings ("1.5"), booleans and nulls (NaN): only numbers pass.
        # Checked once numpy took it (at most 64 levels deep: the recursion is bounded).
        if values is None or not _numeric(y):
            raise DecodeError("bad_label", f"a regression target must be a number or a list "
                                           f"of numbers, got {_short(y)}")
        if values.size != self.config.num_targets:
            raise DecodeError("bad_label", f"expected {self.config.num_targets} target values, "
                                           f"got {values.size}")
        with np.errstate(over="ignore", invalid="ignore"):
            values32 = values.astype(np.float32)
        if not np.isfinite(values32).all():
            raise DecodeError("nonfinite", "regression targets must be finite")
        return values32

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, fields: Mapping[Any, Any]) -> Sample:
        """Validate one entry's fields; raises :class:`DecodeError` with a reason."""
        size = sum(len(k) + len(v) for k, v in fields.items()
                   if isinstance(k, (bytes, str)) and isinstance(v, (bytes, str)))
        if size > self.max_entry_bytes:
            raise DecodeError("oversized", f"entry is {size} bytes; the limit is "
                                           f"{self.max_entry_bytes}")
        xb = _field(fields, "xb")
        xj = _field(fields, "x")
        if xb is not None:
            raw = bytes(xb) if not isinstance(xb, str) else xb.encode("latin-1", "replace")
            if len(raw) != 4 * self.num_features:
                raise DecodeError("wrong_length", f"xb must be {4 * self.num_features} bytes "
                                                  f"({self.num_features} float32), got {len(raw)}")
            x = self.validate_x(np.frombuffer(raw, dtype="<f4"))
        elif xj is not None:
            try:
                parsed = json.loads(_text(xj))
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                raise DecodeError("bad_x", f"x is not a JSON array: {exc}") from None
            if not isinstance(parsed, list):
                raise DecodeError("bad_x", "x must be a JSON array of numbers")
            try:
                arr = np.asarray(parsed, dtype=np.float64)
            except OverflowError:  # an integer beyond float64
                raise DecodeError("nonfinite", _NONFINITE_X) from None
            except (TypeError, ValueError):
                raise DecodeError("bad_x", "x must be a (nested) JSON array of numbers") from None
            # numpy also takes strings ("1.5"), booleans and nulls (NaN): only numbers pass.
            # Rectangular (numpy took it), so at most 64 levels deep: the walk is bounded.
            if not _numbers_only(parsed):
                raise DecodeError("bad_x", "x must hold numbers (no strings, booleans or nulls)")
            x = self.validate_x(arr)
        else:
            raise DecodeError("missing_x", "entry has neither an 'x' nor an 'xb' field")

        yv = _field(fields, "y")
        if yv is None:
            raise DecodeError("missing_label", "entry has no 'y' field")
        try:
            label_raw = json.loads(_text(yv))
        except (ValueError, UnicodeDecodeError, RecursionError):
            if self.label_set == "indices" or not isinstance(yv, (bytes, str)):
                raise DecodeError("bad_label", f"label is not a number: "
                                               f"{_short(_text_or_repr(yv))}") from None
            try:  # a bare word, as redis-cli writes it: the string label itself
                label_raw = _text(yv)
            except UnicodeDecodeError:
                raise DecodeError("bad_label", "label is not UTF-8 text") from None
        return Sample(x, self.validate_y(label_raw))


def _user_label(y: Any) -> int | str:
    """A user label in canonical form: an int (integral floats too) or a non-empty string."""
    if isinstance(y, str):
        if not 0 < len(y) <= MAX_LABEL_LENGTH:
            raise DecodeError("bad_label", f"a string label must have 1 to {MAX_LABEL_LENGTH} "
                                           "characters")
        try:  # JSON's "\ud800" escape decodes to a lone surrogate: no JSON writer takes it back
            y.encode("utf-8")
        except UnicodeEncodeError:
            raise DecodeError("bad_label", "a string label must be Unicode text (it holds a "
                                           "lone surrogate)") from None
        return y
    label = _integer(y, "label must be an integer or a string")
    if not -(1 << 63) <= label < (1 << 63):  # it goes into JSON responses and snapshots
        raise DecodeError("bad_label", f"a numeric label must fit in 64 bits, got "
                                       f"{_short(label)}")
    return label


def _integer(y: Any, what: str) -> int:
    """``y`` as an int label: ints (however large) and integral finite floats; else bad_label."""
    if isinstance(y, bool) or not isinstance(y, (int, float, np.integer, np.floating)):
        raise DecodeError("bad_label", f"{what}, got {_short(y)}")
    if isinstance(y, (int, np.integer)):
        return int(y)
    if not math.isfinite(float(y)):
        raise DecodeError("nonfinite", f"{what}: NaN and Infinity are not labels")
    if float(y) != int(y):
        raise DecodeError("bad_label", f"{what} (an integer), got {_short(y)}")
    return int(y)


def _short(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters for a dead letter's detail; never raises
    (a 4000-digit int or a list nested 900 deep has no repr within Python's limits)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _numbers_only(value: Any) -> bool:
    """JSON numbers (not booleans), possibly in lists; numpy would take "1" or null."""
    if isinstance(value, list):
        return all(_numbers_only(v) for v in value)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numeric(value: Any) -> bool:
    """Numbers (Python or numpy, not booleans), possibly in lists, tuples or numeric arrays."""
    if isinstance(value, np.ndarray):
        return value.dtype.kind in "iuf"
    if isinstance(value, (list, tuple)):
        return all(_numeric(v) for v in value)
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)))


def _text_or_repr(value: Any) -> str:
    try:
        return _text(value)
    except UnicodeDecodeError:
        return repr(value)

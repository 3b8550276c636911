"""Checksums of a checkpoint: SHA-256 digests of its payload, and the CRC-32 of its zip records.

Every tensor is hashed on its own, from its dtype, its shape
and the bytes of its values (made contiguous, on the CPU, in row-major
order), so the digest does not depend on the device, the strides or the
storage it came from. Every top-level entry also gets one digest of its
layout and plain values: the keys and their order, the container types,
every number (floats by their exact ``float.hex``), string and flag, and
each tensor's dtype and shape. :func:`load_checkpoint` recomputes them all
from what it loaded and refuses the file if one differs, naming the entry
(``model['0.weight']``, ``config``, ...). It also reads every record of the
zip archive through Python's :mod:`zipfile`, which checks the CRC-32 that
:func:`torch.save` stores for each record (PyTorch's own reader does not):
that catches a damaged byte anywhere in the file, also in storage bytes no
tensor looks at, and in files of layout version 1, which have no digests.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["ALGORITHM", "damaged_records", "digest_mismatches", "payload_digests"]

ALGORITHM = "sha256"
"""The digest algorithm a checkpoint's ``checksum`` entry names."""
_CHUNK = 1 << 20


def damaged_records(path: Path) -> list[str]:
    """The records of the zip archive whose bytes do not match their stored CRC-32.

    ``torch.serialization.set_crc32_options(False)`` writes 0 for every CRC; a file where every
    non-empty record says 0 carries no CRCs, and nothing is reported for it. A file that is
    not a readable zip archive raises :class:`zipfile.BadZipFile` (or ``OSError``).
    """
    with zipfile.ZipFile(path) as archive:
        records = archive.infolist()
        if not any(record.CRC for record in records if record.file_size):
            return []
        damaged = []
        for record in records:
            try:
                with archive.open(record) as member:
                    while member.read(_CHUNK):
                        pass
            except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError):
                damaged.append(record.filename)
        return damaged


def digest_mismatches(payload: dict[str, Any]) -> list[str]:
    """What in a loaded version-2 payload differs from the digests saved in it (empty when all match)."""
    stored = payload.get("checksum")
    expected = stored.get("digests") if isinstance(stored, dict) and stored.get("algorithm") == ALGORITHM else None
    if not isinstance(expected, dict):
        return ["its checksum entry is missing or unreadable"]
    try:
        actual = payload_digests({key: value for key, value in payload.items() if key != "checksum"})
    except TypeError as error:
        return [str(error)]
    problems = []
    seen = set()
    for key, digest, what in actual:
        seen.add(key)
        if key not in expected:
            problems.append(f"{key} ({what}) is in the file but not in the checksum saved with it")
        elif expected[key] != digest:
            problems.append(f"{key} ({what}) does not match the checksum saved with it")
    problems += [
        f"{key} is missing from the file (the checksum saved with it lists it)" for key in expected if key not in seen
    ]
    return problems


_MAPPINGS = (dict, OrderedDict, Counter)
_SEQUENCES: dict[type, bytes] = {list: b"L", tuple: b"U", torch.Size: b"U"}
_TENSORS = (torch.Tensor, torch.nn.Parameter)
_PLAIN = "tensors and plain values (dicts, lists, tuples, sets, strings, numbers, bytes, None, dtypes, devices)"


def payload_digests(payload: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(name, SHA-256 hex digest, description)`` for each top-level entry (its layout and plain values) and tensor.

    The walk feeds an unambiguous encoding (a type tag, then lengths or a terminator) of every
    value to the entry's hash, and each tensor's dtype, shape and value bytes to a hash of its own.
    """
    found: list[tuple[str, str, str]] = []
    for key, value in payload.items():
        layout = hashlib.sha256()
        tensors: list[tuple[str, str, str]] = []
        _walk(value, str(key), layout, tensors)
        found.append((str(key), layout.hexdigest(), "its keys, layout and plain values"))
        found += tensors
    return found


def _walk(value: Any, path: str, layout: Any, tensors: list[tuple[str, str, str]]) -> None:
    kind = type(value)
    if kind in _TENSORS:
        header = _tensor_header(value, path)
        layout.update(header)
        digest = hashlib.sha256(header)
        data = value.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
        digest.update(memoryview(data.numpy()))
        tensors.append((path, digest.hexdigest(), f"a {value.dtype} tensor of shape {tuple(value.shape)}"))
    elif kind in _MAPPINGS:
        layout.update(b"D%d;" % len(value))
        for key, item in value.items():
            layout.update(_scalar(key, f"{path} (a key)"))
            _walk(item, f"{path}[{key!r}]", layout, tensors)
        attributes = getattr(
            value, "__dict__", {}
        )  # a state_dict's _metadata (module versions) rides along as an attribute
        layout.update(b"A%d;" % len(attributes))
        for name, item in attributes.items():
            layout.update(_scalar(name, f"{path} (an attribute name)"))
            _walk(item, f"{path}.{name}", layout, tensors)
    elif kind in _SEQUENCES:
        layout.update(_SEQUENCES[kind] + b"%d;" % len(value))
        for index, item in enumerate(value):
            _walk(item, f"{path}[{index}]", layout, tensors)
    elif kind is set:
        items = sorted(_scalar(item, f"{path} (a set item)") for item in value)
        layout.update(b"E%d;" % len(items) + b"".join(items))
    else:
        layout.update(_scalar(value, path))


def _tensor_header(tensor: torch.Tensor, path: str) -> bytes:
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_meta:
        raise TypeError(
            f"checkpoint entry {path}: expected a dense tensor, got a {tensor.layout} "
            f"{'quantized ' if tensor.is_quantized else ''}{'meta ' if tensor.is_meta else ''}tensor"
        )
    return b"T" + str(tensor.dtype).encode() + b"%r;" % (tuple(tensor.shape),)


def _scalar(value: Any, path: str) -> bytes:
    kind = type(value)
    if value is None:
        return b"N"
    if kind is bool:
        return b"B1" if value else b"B0"
    if kind is int:
        return b"I%d;" % value
    if kind is float:
        return b"F" + value.hex().encode() + b";"
    if kind is complex:
        return b"C" + value.real.hex().encode() + b"," + value.imag.hex().encode() + b";"
    if kind is str:
        text = value.encode("utf-8", "surrogatepass")
        return b"S%d:" % len(text) + text
    if kind in (bytes, bytearray):
        return (b"Y" if kind is bytes else b"Z") + b"%d:" % len(value) + bytes(value)
    if kind is torch.dtype:
        return b"d" + str(value).encode() + b";"
    if kind is torch.device:
        return b"v" + str(value).encode() + b";"
    raise TypeError(
        f"checkpoint entry {path}: a checkpoint holds only {_PLAIN}, got a {kind.__module__}.{kind.__qualname__}"
    )

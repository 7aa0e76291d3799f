"""The v2 protocol's binary tensor data extension (Triton's; tritonclient uses it by default), for fronts that get the
raw body: the TorchServe handler (KServe's server decodes it itself).

A request body is a JSON header of `Inference-Header-Content-Length` bytes, then the raw data of every input whose
`parameters.binary_data_size` says how many bytes it takes, in input order: BYTES elements as a 4-byte little-endian
length and the bytes, numbers little-endian. An answer moves the outputs asked for in binary (`binary_data_output`
in the request's parameters, or per output `parameters.binary_data`) out of the JSON the same way; the image tensor
then holds the JPEG/PNG bytes themselves instead of base64 text.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from .errors import InvalidRequest

HEADER = "inference-header-content-length"
NUMBERS = {"BOOL": "?", "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8", "UINT8": "<u1",
           "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}


def decode_body(body: bytes, json_length: Any) -> dict:
    """The request document with each binary input's values in its `data`, as if it had come as JSON."""
    try:
        json_length = int(json_length)
    except (TypeError, ValueError):
        raise InvalidRequest(HEADER, json_length, "must be an integer") from None
    if not 0 < json_length <= len(body):
        raise InvalidRequest(HEADER, json_length, f"must be in 1..{len(body)} (the body's length)")
    try:
        document = json.loads(body[:json_length])
    except (ValueError, RecursionError) as e:
        raise InvalidRequest("body", f"<{json_length} bytes>", f"does not start with a JSON header ({e})") from None
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise InvalidRequest("body", type(document).__name__, "must start with a v2 JSON header with inputs")
    offset = json_length
    for k, tensor in enumerate(document["inputs"]):
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
            continue
        size = parameters.pop("binary_data_size")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(body) - offset:
            raise InvalidRequest(f"inputs[{k}].parameters.binary_data_size", size,
                                 f"must be an integer in 0..{len(body) - offset} (the bytes left in the body)")
        tensor["data"] = _values(body[offset:offset + size], tensor.get("datatype"), f"inputs[{k}]")
        offset += size
    if offset != len(body):
        raise InvalidRequest("body", f"<{len(body) - offset} bytes>", "has bytes after the last binary tensor")
    return document


def _values(raw: bytes, datatype: Any, where: str) -> list:
    if datatype == "BYTES":
        values, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise InvalidRequest(where, f"<{len(raw)} bytes>", "has a truncated BYTES element length")
            (length,) = struct.unpack_from("<I", raw, offset)
            if offset + 4 + length > len(raw):
                raise InvalidRequest(where, f"<{len(raw)} bytes>", "has a BYTES element longer than its data")
            values.append(raw[offset + 4:offset + 4 + length].decode("utf-8", "replace"))
            offset += 4 + length
        return values
    if datatype not in NUMBERS:
        raise InvalidRequest(f"{where}.datatype", datatype, f"must be BYTES or one of {', '.join(NUMBERS)}")
    dtype = np.dtype(NUMBERS[datatype])
    if len(raw) % dtype.itemsize:
        raise InvalidRequest(where, f"<{len(raw)} bytes>", f"is not a whole number of {datatype} values")
    return np.frombuffer(raw, dtype).tolist()


def wanted_binary(document: dict) -> tuple[str, ...]:
    """The names of the outputs a request asks for in binary ("*" for all): per output, else binary_data_output."""
    outputs = document.get("outputs")
    if isinstance(outputs, list) and outputs:
        return tuple(o["name"] for o in outputs if isinstance(o, dict) and isinstance(o.get("name"), str)
                     and isinstance(o.get("parameters"), dict) and o["parameters"].get("binary_data"))
    parameters = document.get("parameters")
    return ("*",) if isinstance(parameters, dict) and parameters.get("binary_data_output") is True else ()


def encode_answer(document: dict, binary: tuple[str, ...], raw_images: list[bytes]) -> tuple[bytes, int]:
    """A v2 answer with the outputs in `binary` moved behind its JSON header; returns (body, header length). The
    image output carries `raw_images` (the encoded files) there instead of the base64 text the JSON has."""
    chunks = []
    for output in document["outputs"]:
        if "*" not in binary and output["name"] not in binary:
            continue
        data = raw_images if output["name"] == "image" else output["data"]
        del output["data"]
        if output["datatype"] == "BYTES":
            raw = b"".join(struct.pack("<I", len(v)) + v for v in (d if isinstance(d, bytes) else d.encode()
                                                                    for d in data))
        else:
            raw = np.asarray(data, dtype=NUMBERS[output["datatype"]]).tobytes()
        output.setdefault("parameters", {})["binary_data_size"] = len(raw)
        chunks.append(raw)
    header = json.dumps(document).encode("utf-8")
    return header + b"".join(chunks), len(header)

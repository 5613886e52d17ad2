"""KServe v2 inference tensors over HTTP: the JSON tensor format and Triton's binary tensor
data extension, as ``tritonclient.http`` sends and reads them.

A request body is JSON, optionally followed by binary tensor data: the header
``Inference-Header-Content-Length`` then gives the JSON's length, and an input whose
``parameters.binary_data_size`` is set takes that many bytes, in input order, from what follows.
BYTES elements are a little-endian uint32 length then the bytes; every other type is packed
little-endian. Responses mirror it: an output is sent binary when the request asked
(``outputs[i].parameters.binary_data`` or the request's ``parameters.binary_data_output``).

Pure: no I/O. Errors are ``TensorError`` (the HTTP layer makes them 400s) naming the tensor.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Optional

# datatype -> struct code of one element (BYTES is length-prefixed, handled apart)
_CODES = {"BOOL": "?", "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q", "UINT8": "B",
          "UINT16": "H", "UINT32": "I", "UINT64": "Q", "FP16": "e", "FP32": "f", "FP64": "d"}
DATATYPES = ("BYTES",) + tuple(_CODES)
MAX_ELEMENTS = 1 << 16      # per tensor: a request carries a few scalars and word lists
HEADER = "Inference-Header-Content-Length"


class TensorError(ValueError):
    """A malformed request tensor; the message names it and what was wrong."""


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list
    data: list            # flat, row-major: str for BYTES, bool / int / float otherwise


def _count(name: str, shape: Any) -> int:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise TensorError(f"input {name!r}: invalid shape={json.dumps(shape)[:60]}: expected a list of "
                          "dimensions >= 0")
    n = math.prod(shape)
    if n > MAX_ELEMENTS:
        raise TensorError(f"input {name!r}: shape {shape} holds {n} elements, more than the limit of {MAX_ELEMENTS}")
    return n


def _flatten(x: Any) -> list:
    if not isinstance(x, list):
        return [x]
    out: list = []
    for v in x:
        out.extend(_flatten(v))
    return out


def _check_json_element(name: str, datatype: str, v: Any) -> Any:
    ok = (isinstance(v, str) if datatype == "BYTES" else isinstance(v, bool) if datatype == "BOOL"
          else isinstance(v, int) and not isinstance(v, bool) if datatype[0] in "IU"
          else isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
    if not ok:
        raise TensorError(f"input {name!r}: element {json.dumps(v)[:40]} does not fit datatype {datatype}")
    return v


def parameters(obj: dict, where: str) -> dict:
    """``obj``'s ``parameters`` object (empty if absent)."""
    p = obj.get("parameters")
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise TensorError(f"{where}: parameters={json.dumps(p)[:40]} must be a JSON object")
    return p


def _unpack(name: str, datatype: str, raw: bytes, n: int) -> list:
    if datatype == "BYTES":
        out, off = [], 0
        while off < len(raw):
            if off + 4 > len(raw):
                raise TensorError(f"input {name!r}: binary BYTES data is cut short")
            size = struct.unpack_from("<I", raw, off)[0]
            off += 4
            if off + size > len(raw):
                raise TensorError(f"input {name!r}: binary BYTES element of {size} bytes is cut short")
            try:
                out.append(raw[off:off + size].decode())
            except UnicodeDecodeError:
                raise TensorError(f"input {name!r}: a BYTES element is not UTF-8 text") from None
            off += size
    else:
        code = _CODES[datatype]
        if len(raw) != n * struct.calcsize(code):
            raise TensorError(f"input {name!r}: {len(raw)} bytes of binary data do not hold {n} {datatype} elements")
        out = list(struct.unpack(f"<{n}{code}", raw))
    if len(out) != n:
        raise TensorError(f"input {name!r}: {len(out)} elements do not fill its shape ({n} elements)")
    return out


def parse_infer_request(body: bytes, header_length: Optional[str]) -> tuple[dict, list]:
    """The request's JSON (``id``, ``parameters``, ``outputs``) and its input tensors."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise TensorError(f"invalid {HEADER}={header_length[:20]!r}: expected the JSON header's length in "
                              f"bytes, at most the body's {len(body)}")
        head, binary = body[:int(header_length)], body[int(header_length):]
    else:
        head, binary = body, b""
    try:
        req = json.loads(head)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise TensorError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise TensorError('the request must be a JSON object with a list "inputs"')
    tensors, off = [], 0
    for i, t in enumerate(req["inputs"]):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise TensorError(f"inputs[{i}] must be an object with a string name")
        name, datatype = t["name"], t.get("datatype")
        if datatype not in DATATYPES:
            raise TensorError(f"input {name!r}: unknown datatype={json.dumps(datatype)[:40]}; "
                              f"known: {', '.join(DATATYPES)}")
        n = _count(name, t.get("shape"))
        size = parameters(t, f"input {name!r}").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or off + size > len(binary):
                raise TensorError(f"input {name!r}: binary_data_size={json.dumps(size)[:20]} does not fit the "
                                  f"{len(binary) - off} bytes of binary data left")
            data = _unpack(name, datatype, binary[off:off + size], n)
            off += size
        else:
            if "data" not in t:
                raise TensorError(f"input {name!r} has neither data nor binary_data_size")
            data = [_check_json_element(name, datatype, v) for v in _flatten(t["data"])]
            if len(data) != n:
                raise TensorError(f"input {name!r}: {len(data)} data elements do not fill shape {t['shape']}")
        tensors.append(Tensor(name, datatype, list(t["shape"]), data))
    if off != len(binary):
        raise TensorError(f"{len(binary) - off} bytes of binary data follow the inputs that no input claims")
    return req, tensors


def _pack(t: Tensor) -> bytes:
    if t.datatype == "BYTES":
        parts = []
        for s in t.data:
            b = s.encode()
            parts += [struct.pack("<I", len(b)), b]
        return b"".join(parts)
    return struct.pack(f"<{len(t.data)}{_CODES[t.datatype]}", *t.data)


def encode_infer_response(head: dict, outputs: list[Tensor], binary: set) -> tuple[bytes, dict]:
    """The response body and its headers: ``head`` (model_name, model_version, id) with
    ``outputs``; the outputs named in ``binary`` go as binary data after the JSON."""
    tail, entries = [], []
    for t in outputs:
        e: dict = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if t.name in binary:
            raw = _pack(t)
            e["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            e["data"] = t.data
        entries.append(e)
    text = json.dumps({**head, "outputs": entries}).encode()
    if not tail:
        return text, {"Content-Type": "application/json"}
    return text + b"".join(tail), {"Content-Type": "application/octet-stream", HEADER: str(len(text))}

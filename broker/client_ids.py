"""Request ids scoped per client: (client identity, the client's request id) -> the broker's key.

The key is the client's own id unless another client's request in flight holds it; then it is
``ID~N``. So one client can neither cancel another's request nor learn that an id is in use (a
duplicate is refused only within one client), and workers see only the broker's keys. Pure: no
I/O, no clock (``broker/state.py`` owns one ``ClientIds``).
"""
from __future__ import annotations

import itertools
from typing import Any, Container, Optional

import msgspec


class ClientIds:
    def __init__(self) -> None:
        self._keys: dict[tuple, str] = {}
        self._renamed = itertools.count(1)

    def key(self, client: bytes, rid: str) -> Optional[str]:
        """The broker's key of this client's request ``rid`` in flight, else None."""
        return self._keys.get((client, rid))

    def add(self, client: bytes, rid: str, taken: Container) -> str:
        """A key for a new request of this client, not in ``taken`` (the requests in flight)."""
        key = rid
        while key in taken:                  # another client's request holds this id
            key = f"{rid}~{next(self._renamed)}"
        self._keys[(client, rid)] = key
        return key

    def drop(self, client: bytes, rid: str) -> None:
        self._keys.pop((client, rid), None)

    def __len__(self) -> int:
        return len(self._keys)


def shown_to_client(msg: Any, rid: str) -> Any:
    """A message for a client, carrying the client's own request id (never the broker's key)."""
    return msg if msg.request_id == rid else msgspec.structs.replace(msg, request_id=rid)

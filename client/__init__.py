"""Python client of the serving broker: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both speak ``broker.protocol`` over one ZeroMQ DEALER socket and multiplex many requests on it.
This package imports only ``broker.protocol``, pyzmq, msgpack and the standard library: never
torch, workers/ or transfer/.

    with Client("tcp://127.0.0.1:5555") as client:
        print(client.generate("Hello", max_tokens=16).text)
        for chunk in client.stream("Tell me a story", temperature=0.7):
            print(chunk.text, end="")
"""
from .aio import AsyncClient, AsyncStream
from .errors import (BrokerUnavailable, ClientError, InvalidRequest, Overloaded, RequestFailed,
                     RequestTimeout)
from .request import Chunk, Completion
from .sync import Client, Stream

__all__ = [
    "Client", "AsyncClient", "Stream", "AsyncStream", "Completion", "Chunk",
    "ClientError", "RequestFailed", "Overloaded", "InvalidRequest", "RequestTimeout",
    "BrokerUnavailable",
]

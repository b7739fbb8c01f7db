"""Where Dask work runs: a given client, a scheduler address, or an in-process cluster.

Kept free of torch and Prefect imports so light steps (stitch, export) stay light.
"""

from __future__ import annotations

import threading
from typing import Any


class dask_client:  # noqa: N801 - used like a function in a with statement
    """Use a given client, connect to an address, or start an in-process LocalCluster."""

    def __init__(self, client: Any = None, address: str | None = None, threads: int = 3) -> None:
        self.given = client
        self.address = address
        self.threads = threads
        self._owned: list[Any] = []

    def __enter__(self) -> Any:
        from distributed import Client, LocalCluster

        if self.given is not None:
            return self.given
        if self.address:
            client = Client(self.address)
            self._owned.append(client)
            return client
        cluster = LocalCluster(
            n_workers=1,
            threads_per_worker=self.threads,
            processes=False,
            # the scheduler's and the worker's HTTP servers listen on loopback only
            dashboard_address="127.0.0.1:0",
            worker_dashboard_address="127.0.0.1:0",
        )
        client = Client(cluster)
        self._owned += [client, cluster]
        return client

    def __exit__(self, *exc: object) -> None:
        for obj in self._owned:
            obj.close()
        self._owned.clear()


_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def client_for(address: str) -> Any:
    """A Dask client for a scheduler address, one per process (reused across tasks)."""
    from distributed import Client

    with _clients_lock:
        client = _clients.get(address)
        if client is None or client.status not in ("running", "connecting"):
            client = Client(address, set_as_default=False)
            _clients[address] = client
        return client


__all__ = ["client_for", "dask_client"]

"""Where Dask work runs: a given client, a scheduler address, or an in-process cluster.

Kept free of torch and Prefect imports so light steps (stitch, export) stay light.
"""

from __future__ import annotations

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
            n_workers=1, threads_per_worker=self.threads, processes=False, dashboard_address=None
        )
        client = Client(cluster)
        self._owned += [client, cluster]
        return client

    def __exit__(self, *exc: object) -> None:
        for obj in self._owned:
            obj.close()
        self._owned.clear()


__all__ = ["dask_client"]

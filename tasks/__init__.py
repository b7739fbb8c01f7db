"""The work of segflow as plain functions over stores and boxes (Dask and zarr; no Prefect).

:mod:`tasks.pipeline` is the one pipeline every door runs; below it the steps (ingest,
segment, instances, export, report), the engine (the blockwise runner, fenced leases, the
output policy, run state) and storage. The Prefect ``@task`` wrappers live in ``flows/``
beside the flows that use them, so every step is testable without Prefect.
"""

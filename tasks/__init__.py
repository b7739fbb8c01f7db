"""The work steps of segflow as plain functions over stores and boxes.

Each step (ingest, segment a region, stitch, export, report) is plain Python testable without
Prefect; thin Prefect ``@task`` wrappers live beside them. Dask and zarr are used here.
"""

"""Prefect flows that only compose the tasks: segment a volume, nightly inbox, train."""

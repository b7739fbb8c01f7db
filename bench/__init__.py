"""segflow benchmarks: each prints one JSON object (run with `make bench`)."""

"""Where a run lives and the write-once commit protocol: the fsspec store, Parquet, the run's layout, the lease, retention, verify, gc."""

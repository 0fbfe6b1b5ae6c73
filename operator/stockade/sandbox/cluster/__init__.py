"""Cluster services of the sandbox's own: its cluster DNS (`dns`), and finding and entering a
pod's network namespace (`pods`, for `stockade sandbox exec` and `probe`)."""

"""What runs for each sandbox node inside or beside its network namespace (kube-proxy and the
forwarder that lets it reach the API server)."""

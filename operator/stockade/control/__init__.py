"""The operator side: kopf handlers that watch policies and cluster state and publish
hand-off objects for the agents."""

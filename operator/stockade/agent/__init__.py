"""The node agent: watches its node's hand-off objects and keeps the datapath in sync."""

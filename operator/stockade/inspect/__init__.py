"""What a person asks of a running stockade: `stockade explain`, `observe`, `usage` and
`status` (also as `kubectl stockade ...`, the `kubectl-stockade` entry point).

- `live`: the cluster as the API server holds it now, as the model's values (for the reference
  evaluator) and the policies stockade enforces;
- `agents`: how the commands reach each node's agent: through the API server's pods/proxy
  subresource on a cluster (RBAC: `get` on `pods/proxy` in the agents' namespace), or at URLs
  given with `--agent NODE=URL` (the sandbox, whose agents are processes, not pods);
- `explain`, `observe` (with `usage`), `status`: the commands; `command`: their parsers.

A client of the runtime: it never imports the datapath nor the bench (.importlinter).
"""

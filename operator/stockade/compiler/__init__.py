"""The compiler: policies and cluster state lowered to datapath tables, and C rendered per shape.

Pure functions of their inputs (no I/O): the operator calls them to build hand-off objects, the
test engines call them to build what the agent would load.
"""

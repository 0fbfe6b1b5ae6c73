"""The node's kernel side: compile rendered C, load it with libbpf, write maps, attach tc hooks.

Only this package (and the sandbox's netns wiring) touches the kernel. It does not import the
compiler: rendered programs and map contents reach it as plain values (source text, key and value
bytes), and the agent composes the two.
"""

"""The pure core of stockade: policy objects, selectors and their meaning, with no I/O.

Everything above this layer (compiler, operator, agent, conformance runner) imports from here;
nothing here imports kopf, kubernetes or anything that touches the kernel.
"""

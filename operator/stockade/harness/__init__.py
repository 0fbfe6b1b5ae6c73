"""The datapath test harness: load a Shape's programs with their maps, build packets in Python,
and ask the loaded programs for a verdict with BPF_PROG_TEST_RUN.

Part of the bench, beside the sandbox and the conformance engines: the bpf test tier, the
`datapath` conformance engine and the benchmarks use it; the runtime (what the operator and agent
images install) never imports it (`.importlinter`, "the runtime never imports the bench").
"""

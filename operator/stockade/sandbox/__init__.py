"""The sandbox: a real kube-apiserver and etcd plus network-namespace nodes and pods.

Used by the test suite (pytest fixtures), by `stockade sandbox` and by `stockade demo`. It is test
infrastructure that ships with the product so that a laptop can run the whole stack without Docker:
part of the bench, which the runtime never imports and the images leave out; its own dependencies
(the PKI's cryptography) come with the `bench` extra.
"""

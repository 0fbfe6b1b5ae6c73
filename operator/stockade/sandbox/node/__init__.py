"""A sandbox node as a runtime sees it: pods wired by the real CNI plugins (`cni`, `network`), a
kubelet stand-in that runs the Pods bound to the node (`kubelet`, `podspec`, `supervise`), and
kube-proxy (`proxy`) with the forwarder that lets it reach the API server (`forwarder`)."""

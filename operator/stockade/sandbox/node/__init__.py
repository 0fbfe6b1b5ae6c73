"""A sandbox node as a runtime sees it: pods wired by the real CNI plugins (`cni`) and a kubelet
stand-in per node that runs the Pods bound to it (`kubelet`)."""

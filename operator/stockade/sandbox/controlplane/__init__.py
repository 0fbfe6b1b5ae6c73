"""The sandbox control plane: etcd, kube-apiserver, kube-controller-manager and kube-scheduler
(`server`), the certificates and kubeconfigs they use (`pki`), and the CRDs installed in it
(`crds`)."""

"""What runs in the sandbox's pods and how programs put them there: the helper process that
serves and probes inside a pod (`podagent`, `traffic`) and the handle on a running sandbox that
the demo and the e2e engine add pods and policies through (`running`)."""

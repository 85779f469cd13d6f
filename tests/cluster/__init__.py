"""The test suite's own Kubernetes cluster: real control-plane binaries, a node agent that runs pods as local
processes, and the fixtures that give tests access to it. See README.md."""

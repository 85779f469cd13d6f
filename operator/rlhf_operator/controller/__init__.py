"""The kopf operator: each RLHFPipeline's stages as Kubernetes Jobs, driven by :func:`rlhf_operator.plan.plan`.

One concept per module:

* ``names``: labels, annotations and the deterministic names of a stage's Job, Service and ConfigMap;
* ``manifests``: pure ``build_*`` functions from a validated pipeline to Job / headless Service / ConfigMap dicts;
* ``observe``: what a stage's Job (and its pods, and the store) say, as the plan's ``StageObservation``;
* ``conditions``: the status (phase, stages, conditions, printer-column fields) from a plan and observations;
* ``kube``: the few API calls the reconciler makes;
* ``reconcile``: observe -> plan -> act -> write status and Events, for one pipeline;
* ``handlers``: the kopf handlers that trigger it; ``main``: the process (probes, metrics, logs, shutdown,
  leader election).

The operator keeps no state of its own: everything it decides comes from the API server and the store, so a
restarted operator adopts the Jobs it finds (deterministic names, owner references) and never duplicates them.
"""

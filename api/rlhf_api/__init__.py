"""rlhf-operator's API and the contracts both images import: what the operator image (the controller, the local
runner) and the trainer image (``rlhf-train``) must agree on, defined once, since the two ship apart.

* :mod:`rlhf_api.spec`: the RLHFPipeline spec (the CRD is generated from it); :mod:`rlhf_api.status` and
  :mod:`rlhf_api.phases`: its status.
* :mod:`rlhf_api.stage_config`: the config each stage gets, where its output goes, and its digest.
* :mod:`rlhf_api.entrypoint`: how ``rlhf-train`` is started and what it answers (exit codes, environment,
  termination message).
* :mod:`rlhf_api.artifacts`: the artifact store, manifests, live progress and the checkpoint pointer.
* :mod:`rlhf_api.metric_keys`: the metrics a stage publishes that the executors read.

Nothing here imports torch or kopf.
"""

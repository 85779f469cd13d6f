"""rlhf-operator's trainer image: the ``rlhf-train`` entrypoint and one module per pipeline stage.

Every stage reads a stage config (see ``rlhf_api.stage_config``), pulls its inputs from the artifact
store through their manifests, trains, and publishes its outputs with the manifest written last.
"""

"""rlhf-operator's control plane: the RLHFPipeline spec, the stage state machine, the artifact store,
the local runner and (with the ``operator`` extra) the kopf controller.

Nothing imported here pulls in torch or kopf, so the trainer image and the operator image can both use it.
"""

__version__ = "0.1.0"

"""rlhf-operator's executors: the pipeline's state machine (``plan``), the local runner and the ``rlhf`` CLI, and
(with the ``operator`` extra) the kopf controller. The API they execute is :mod:`rlhf_api`.

Nothing imported here pulls in torch; kopf only under ``rlhf_operator.controller``.
"""

__version__ = "0.1.0"

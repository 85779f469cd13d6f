"""Optional accelerations: faster ways to compute what the stages would compute anyway.

Each one applies only where it helps (a CPU, a dtype, a kind of layer) and otherwise leaves PyTorch's own path;
where it applies, its results equal the plain path's to float rounding. Turning one off changes speed, not what
is trained.

* :mod:`~rlhf_trainer.accelerations.onednn_linear`: float32 linear layers through oneDNN on AMD CPUs with
  AVX-512 (``RLHF_ONEDNN_LINEAR`` overrides);
* :mod:`~rlhf_trainer.accelerations.decoding_weights`: decoding from copies of the weights made for it (LoRA
  folded in, packed for oneDNN on x86 CPUs);
* :mod:`~rlhf_trainer.accelerations.cpu`: what the CPU says it has, for the decisions above.
"""

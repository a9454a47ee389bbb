"""What the Kubeflow pipeline takes, written once: the resources each step's pod asks of the cluster
by default (used by the pipeline's options, the Trainer job's options and the CLI's defaults)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class PodResources:
    """Kubernetes quantities, in binary units for memory."""

    cpu: str = "8"
    memory: str = "32Gi"
    shm_size: str = "8Gi"  # the in-memory /dev/shm for the data loaders and NCCL


POD = PodResources()

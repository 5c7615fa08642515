"""Cell population discovery (conf/task/discovery.yaml): unsupervised adaptation, Leiden clusters, scores."""

from scpeft_cli.tasks.discovery.task import DiscoveryTask

__all__ = ["DiscoveryTask"]

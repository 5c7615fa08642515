"""Batch integration (conf/task/integration.yaml): objectives, scib's metrics, baselines, outputs."""

from scpeft_cli.tasks.integration.task import IntegrationTask

__all__ = ["IntegrationTask"]

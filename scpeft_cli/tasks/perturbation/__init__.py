"""Perturbation response prediction (scPEFT's perturbation task, GEARS-style)."""

from scpeft_cli.tasks.perturbation.task import PerturbationTask

__all__ = ["PerturbationTask"]

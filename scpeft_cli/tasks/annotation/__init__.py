"""Cell-type annotation (conf/task/annotation.yaml)."""

from scpeft_cli.tasks.annotation.heads import ClsDecoder
from scpeft_cli.tasks.annotation.task import AnnotationTask, Evaluation

__all__ = ["AnnotationTask", "ClsDecoder", "Evaluation"]

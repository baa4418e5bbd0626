"""Architectures and the model wrapper shared by teachers and students."""

from .base import Architecture, KamalModel, build_student_for, merge_tasks, task_from_dict

__all__ = ["Architecture", "KamalModel", "build_student_for", "merge_tasks", "task_from_dict"]

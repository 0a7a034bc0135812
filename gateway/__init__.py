"""A pluggable model gateway for Bitrix24 AI engines."""

from gateway.hookspecs import hookimpl
from gateway.tasks import Category, Task, TaskRefused

__version__ = "0.1.0"
__all__ = ["Category", "Task", "TaskRefused", "__version__", "hookimpl"]

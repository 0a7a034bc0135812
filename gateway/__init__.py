"""A pluggable model gateway for Bitrix24 AI engines.

Plugins import from :mod:`gateway.spi` (their contract) and test with :mod:`gateway.testing`;
the few names below are kept here for plugins written before ``gateway.spi`` existed."""

from gateway.hookspecs import hookimpl
from gateway.tasks import Category, Task, TaskRefused

__version__ = "0.1.0"
__all__ = ["Category", "Task", "TaskRefused", "__version__", "hookimpl"]

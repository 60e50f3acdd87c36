"""The operator console (``/console/`` on the admin port): see ``views``."""

from .views import ConsoleConfig, add_console

__all__ = ["ConsoleConfig", "add_console"]

"""berthd: an event-sourced host daemon for sandboxes, code kernels and sessions."""

__version__ = "0.1.0"

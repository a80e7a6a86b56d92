"""Config, the ``berthd`` command line and the daemon's lifecycle."""

"""The edges: the Falcon app served by waitress, and the websockets server."""

from berthd.http.app import create_app
from berthd.http.deps import Deps, Limits

__all__ = ["Deps", "Limits", "create_app"]

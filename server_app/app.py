"""The ServerApp: every run is a ``RunLoop`` over the validated run config."""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from plateau.config import ConfigValue

from .build import build_strategy, load_config
from .callbacks import RunFailed
from .loop import run

__all__ = ["RunFailed", "app", "build_server_app", "build_strategy", "load_config", "run"]


def build_server_app(overrides: Mapping[str, ConfigValue] | None = None) -> ServerApp:
    """A ServerApp reading the run config, with optional overrides (used by in-process tests,
    where ``run_simulation`` leaves the run config empty)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run(grid, {**context.run_config, **(overrides or {})})

    return server_app


app = build_server_app()

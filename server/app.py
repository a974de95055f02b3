"""Flower ServerApp (``flwr run .``): configured from the run config, built in fedtune.flower."""

from fedtune.flower.apps import build_server_app

app = build_server_app()

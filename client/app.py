"""Flower ClientApp (``flwr run .`` / SuperNodes): configured from the run config, built in fedtune.flower."""

from fedtune.flower.apps import build_client_app

app = build_client_app()

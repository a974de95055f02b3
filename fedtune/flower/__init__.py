"""The Flower adapter: the only part of fedtune that imports ``flwr``.

It turns fedtune's typed, Flower-free pieces (config, FedKSeed server/client, codec,
aggregators) into a ServerApp, a ClientApp and a Strategy on Flower's current Message API.
"""

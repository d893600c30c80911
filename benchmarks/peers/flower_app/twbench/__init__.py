"""The Flower side of benchmarks/peers: imports only flwr, torch and the standard library."""

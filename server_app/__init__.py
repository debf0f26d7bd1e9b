"""The Plateau ServerApp: config, round loop, central evaluation and run outputs."""

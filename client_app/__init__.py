"""The Plateau ClientApp: local training rules and the client side of the DP mechanism."""

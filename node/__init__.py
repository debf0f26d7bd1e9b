"""A node's tooling outside the Flower app: the warm trainer (``node.trainer``, its server
``node.service``), the paced SuperNode (``node.supernode``) and the fork-server SuperExec
(``node.superexec``). The operator installs these with the image; ``flwr run`` ships the app
(the ServerApp and the ClientApp), never these."""

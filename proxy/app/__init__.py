"""The application: config, the keynode CLI, the node runner and its control socket,
port forwarding, the demo."""

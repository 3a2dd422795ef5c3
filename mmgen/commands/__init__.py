"""One module per `mmgen` subcommand group; each exposes ``register(app)``."""

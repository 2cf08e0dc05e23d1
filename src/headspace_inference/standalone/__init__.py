"""The standalone app: a minimal host of its own (domain tables, migrations) around the
extension, built by ``create_app()``."""

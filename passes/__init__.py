"""Graph passes and decomposition math for convfx. Imports nothing from ``convfx``."""

"""Shipped YAML configs (package data of ``conceptsmith.configs``); see ``conceptsmith.resources``."""

"""ConceptSmith: erase, compose and benchmark concepts in diffusers text-to-image pipelines."""

__version__ = "0.1.0"
